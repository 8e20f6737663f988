"""The dense reference against independent, explicit computations of docs/semantics.md.

The oracle here is written differently from the reference on purpose: K/V are expanded per
query head, pooled keys are built group by group in Python, and the softmax runs row by row.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import psa_kernels
from psa_kernels import reference as R

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def naive_psa(q, k, v, level_map, *, causal, scale, block_q, block_k, key_padding_mask):
    """Row-by-row PSA in float64 with explicitly pooled keys (the oracle)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    valid = torch.ones(B, Lk, dtype=torch.bool) if key_padding_mask is None else key_padding_mask
    out = torch.zeros(B, Hq, Lq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            hk = h // group
            hm = h if level_map.shape[1] == Hq else hk
            keys, vals, bias, last, blocks, factors = [], [], [], [], [], []
            for p in (1, 2, 4, 8):
                for t in range(math.ceil(Lk / p)):
                    idx = [s for s in range(t * p, min(Lk, (t + 1) * p)) if valid[b, s]]
                    if not idx:
                        continue
                    keys.append(k[b, hk, idx].double().mean(0))
                    vals.append(v[b, hk, idx].double().mean(0))
                    bias.append(math.log(len(idx)))
                    last.append(max(idx))
                    blocks.append((t * p) // block_k)
                    factors.append(p)
            if not keys:
                continue
            K, V = torch.stack(keys), torch.stack(vals)
            bias, last = torch.tensor(bias, dtype=torch.float64), torch.tensor(last)
            blocks, factors = torch.tensor(blocks), torch.tensor(factors)
            for i in range(Lq):
                lvl = level_map[b, hm, i // block_q].long()[blocks]
                use = lvl == factors
                if causal:
                    use &= last <= (Lk - Lq + i)
                if not use.any():
                    continue
                logits = q[b, h, i].double() @ K[use].T * scale + bias[use]
                out[b, h, i] = torch.softmax(logits, -1) @ V[use]
    return out


@st.composite
def attention_case(draw, max_len=150):
    ratio = draw(st.sampled_from([1, 2, 7]))
    hkv = draw(st.integers(1, 2))
    D = draw(st.sampled_from([64, 80, 128]))
    block_q = draw(st.sampled_from([16, 32, 64]))
    block_k = draw(st.sampled_from([16, 32, 64, 128]))
    causal = draw(st.booleans())
    Lk = draw(st.integers(1, max_len))
    Lq = draw(st.integers(1, Lk)) if causal else draw(st.integers(1, max_len))
    B = draw(st.integers(1, 2))
    padded = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(B=B, Hq=hkv * ratio, Hkv=hkv, Lq=Lq, Lk=Lk, D=D, block_q=block_q, block_k=block_k, causal=causal,
                padded=padded, seed=seed)


def make_inputs(c, dtype=torch.float64):
    g = torch.Generator().manual_seed(c["seed"])
    q = torch.randn(c["B"], c["Hq"], c["Lq"], c["D"], generator=g, dtype=dtype)
    k = torch.randn(c["B"], c["Hkv"], c["Lk"], c["D"], generator=g, dtype=dtype)
    v = torch.randn(c["B"], c["Hkv"], c["Lk"], c["D"], generator=g, dtype=dtype)
    pad = None
    if c["padded"]:  # left padding of a random length per sequence (possibly all of it)
        starts = torch.randint(0, c["Lk"] + 1, (c["B"],), generator=g)
        pad = torch.arange(c["Lk"])[None, :] >= starts[:, None]
    return q, k, v, pad


def shape_of_map(c, heads):
    return (c["B"], heads, math.ceil(c["Lq"] / c["block_q"]), math.ceil(c["Lk"] / c["block_k"]))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


@SETTINGS
@given(attention_case())
def test_all_level_one_equals_dense_sdpa(c):
    q, k, v, pad = make_inputs(c)
    lm = torch.ones(shape_of_map(c, c["Hkv"]), dtype=torch.int8)
    out = psa_kernels.psa_attention(q, k, v, lm, causal=c["causal"], block_q=c["block_q"], block_k=c["block_k"],
                                    key_padding_mask=pad)
    # Oracle: torch SDPA on expanded K/V with an explicit bottom-right causal + padding mask.
    group = c["Hq"] // c["Hkv"]
    ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    mask = torch.ones(c["Lq"], c["Lk"], dtype=torch.bool)
    if c["causal"]:
        mask = torch.arange(c["Lk"])[None, :] <= (torch.arange(c["Lq"]) + c["Lk"] - c["Lq"])[:, None]
    mask = mask[None, None].expand(c["B"], 1, -1, -1)
    if pad is not None:
        mask = mask & pad[:, None, None, :]
    empty = ~mask.any(-1, keepdim=True)
    ref = F.scaled_dot_product_attention(q, ke, ve, attn_mask=mask | empty).masked_fill(empty, 0.0)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) < 1e-10
    assert torch.all(out.masked_select(empty) == 0)


@SETTINGS
@given(attention_case(max_len=100), st.data())
def test_random_level_maps_match_explicit_pooling(c, data):
    q, k, v, pad = make_inputs(c)
    heads = data.draw(st.sampled_from([c["Hq"], c["Hkv"]]))
    g = torch.Generator().manual_seed(c["seed"] + 1)
    choices = torch.tensor([0, 1, 2, 4, 8], dtype=torch.int8)
    lm = choices[torch.randint(0, 5, shape_of_map(c, heads), generator=g)]
    kw = dict(causal=c["causal"], block_q=c["block_q"], block_k=c["block_k"], key_padding_mask=pad)
    out = psa_kernels.psa_attention(q, k, v, lm, **kw)
    ref = naive_psa(q, k, v, lm, scale=c["D"] ** -0.5, **kw)
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) < 1e-10 or ref.norm() == out.norm() == 0


@pytest.mark.parametrize("p", [2, 4, 8])
def test_whole_sequence_at_one_level_equals_attention_over_pooled_keys(p):
    torch.manual_seed(p)
    Lk, D = 77, 64  # 77 is not a multiple of p: the last group is short and carries ln(count)
    q, k, v = torch.randn(1, 2, 40, D, dtype=torch.float64), torch.randn(2, 1, Lk, D).double()[:1], None
    k = torch.randn(1, 1, Lk, D, dtype=torch.float64)
    v = torch.randn(1, 1, Lk, D, dtype=torch.float64)
    lm = torch.full((1, 2, 3, 3), p, dtype=torch.int8)
    out = psa_kernels.psa_attention(q, k, v, lm, block_q=16, block_k=32)
    groups = [range(t, min(Lk, t + p)) for t in range(0, Lk, p)]
    kp = torch.stack([k[0, 0, list(g)].mean(0) for g in groups])
    vp = torch.stack([v[0, 0, list(g)].mean(0) for g in groups])
    bias = torch.tensor([math.log(len(g)) for g in groups], dtype=torch.float64)
    ref = torch.softmax(q[0] @ kp.T * D**-0.5 + bias, -1) @ vp
    assert rel_err(out[0], ref) < 1e-12


def test_partly_visible_pooled_group_is_dropped():
    torch.manual_seed(0)
    Lq = Lk = 64
    q, k, v = (torch.randn(1, 1, Lq, 32, dtype=torch.float64) for _ in range(3))
    lm = torch.full((1, 1, 1, 1), 8, dtype=torch.int8)
    out = psa_kernels.psa_attention(q, k, v, lm, causal=True, block_q=64, block_k=64)
    # Query 11 sees group [0, 8) whole and group [8, 16) only in part: that group is dropped, so
    # changing the values of tokens 8..15 does not move row 11, but does move row 15.
    v2 = v.clone()
    v2[..., 8:16, :] += 10.0
    out2 = psa_kernels.psa_attention(q, k, v2, lm, causal=True, block_q=64, block_k=64)
    assert torch.allclose(out[..., 11, :], out2[..., 11, :])
    assert not torch.allclose(out[..., 15, :], out2[..., 15, :])
    # Rows 0..6 see no whole group: output exactly 0.
    assert torch.all(out[..., :7, :] == 0)
    assert torch.allclose(out[..., 7, :], v[..., :8, :].mean(-2))


def test_fully_masked_rows_are_zero_not_nan():
    torch.manual_seed(1)
    q = torch.randn(2, 4, 48, 64, dtype=torch.float16)
    k, v = torch.randn(2, 2, 48, 64, dtype=torch.float16), torch.randn(2, 2, 48, 64, dtype=torch.float16)
    pad = torch.ones(2, 48, dtype=torch.bool)
    pad[1, :20] = False  # left padding: causal rows 0..19 of sequence 1 see nothing
    lm = torch.ones(2, 4, 3, 3, dtype=torch.int8)
    lm[0, 1, 1] = 0  # an empty row of blocks
    out = psa_kernels.psa_attention(q, k, v, lm, causal=True, block_q=16, block_k=16, key_padding_mask=pad)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert torch.all(out[1, :, :20] == 0)
    assert torch.all(out[0, 1, 16:32] == 0)
    assert out[1, :, 20:].abs().sum() > 0
    dense = psa_kernels.dense_attention(q, k, v, causal=True, key_padding_mask=pad)
    assert torch.isfinite(dense).all() and torch.all(dense[1, :, :20] == 0)


def test_decode_sees_every_key_and_chunked_prefill_is_bottom_right():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 50, 64), torch.randn(1, 2, 50, 64)
    out = psa_kernels.dense_attention(q, k, v, causal=True)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    assert rel_err(out, ref) < 1e-6
    q = torch.randn(1, 4, 10, 64)
    lm = torch.ones(1, 2, 1, 4, dtype=torch.int8)
    psa = psa_kernels.psa_attention(q, k, v, lm, causal=True, block_q=16, block_k=16)
    full = psa_kernels.dense_attention(torch.cat([torch.randn(1, 4, 40, 64), q], 2), k, v, causal=True)
    assert rel_err(psa, full[:, :, 40:]) < 1e-5


def test_level_map_per_kv_head_equals_expanded_per_query_head():
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 14, 40, 80), torch.randn(1, 2, 70, 80), torch.randn(1, 2, 70, 80)
    choices = torch.tensor([0, 1, 2, 4, 8], dtype=torch.int8)
    lm = choices[torch.randint(0, 5, (1, 2, 3, 3))]
    a = psa_kernels.psa_attention(q, k, v, lm, block_q=16, block_k=32)
    b = psa_kernels.psa_attention(q, k, v, lm.repeat_interleave(7, 1), block_q=16, block_k=32)
    assert torch.equal(a, b)


def test_pyramid_means_count_only_valid_tokens():
    k = torch.arange(20, dtype=torch.float32).view(1, 1, 20, 1).expand(1, 1, 20, 2).contiguous()
    pad = torch.ones(1, 20, dtype=torch.bool)
    pad[0, :3] = False
    pyr = psa_kernels.build_pyramid(k, k, pad)
    assert pyr[8].counts.tolist() == [[5, 8, 4]]
    assert pyr[8].keys[0, 0, :, 0].tolist() == [5.0, 11.5, 17.5]  # mean(3..7), mean(8..15), mean(16..19)
    assert pyr[8].last.tolist() == [[7, 15, 19]]
    assert pyr[2].counts[0, :3].tolist() == [0, 1, 2]


def test_density_and_sparsity_formula():
    lm = torch.tensor([[[[1, 0], [2, 8]]]], dtype=torch.int8)
    rho = psa_kernels.density(lm, causal=False, q_len=64, k_len=64, block_q=32, block_k=32)
    assert rho.item() == pytest.approx((1 + 0 + 0.5 + 0.125) / 4)
    # Causal: pair (0, 1) is invisible and does not count.
    rho = psa_kernels.density(lm, causal=True, q_len=64, k_len=64, block_q=32, block_k=32)
    assert rho.item() == pytest.approx((1 + 0.5 + 0.125) / 3)
    assert psa_kernels.sparsity(lm, causal=True, q_len=64, k_len=64, block_q=32, block_k=32).item() == \
        pytest.approx(1 - (1 + 0.5 + 0.125) / 3)


def test_assign_levels_energy_and_quantile():
    scores = torch.tensor([[0.06, 0.5, 0.15, 0.25, 0.04]])
    vis = torch.ones_like(scores, dtype=torch.bool)
    # Ranked: 0.5 (prec 0), 0.25 (0.5), 0.15 (0.75), 0.06 (0.9), 0.04 (0.96).
    lv = psa_kernels.assign_levels(scores, vis, mode="energy", thresholds=(0.7, 0.8, 0.9, 0.9))
    assert lv.tolist() == [[0, 1, 2, 1, 0]]
    lv = psa_kernels.assign_levels(scores, vis, mode="quantile", thresholds=(0.3, 0.5, 0.7, 0.9))
    assert lv.tolist() == [[4, 1, 2, 1, 8]]
    vis[0, 1] = False  # an invisible block gets 0 and does not count in the ranking
    lv = psa_kernels.assign_levels(scores, vis, mode="quantile", thresholds=(0.3, 0.5, 0.7, 0.9))
    assert lv.tolist() == [[4, 0, 1, 1, 8]]  # ranks 0.25, 0.15, 0.06, 0.04 -> 0, 1/4, 2/4, 3/4


def test_similarity_cap_on_constructed_keys():
    D, bk = 16, 32
    base = torch.randn(D)
    smooth = base.repeat(bk, 1) + 0.01 * torch.randn(bk, D)  # block 0: near-identical tokens
    rough = torch.randn(bk, D)  # block 1: unrelated tokens
    k = torch.cat([smooth, rough])[None, None]
    cap = psa_kernels.similarity_cap(k, block_k=bk, thresholds=(0.75, 0.7, 0.7))
    assert cap.tolist() == [[[8, 1]]]
    cap = psa_kernels.similarity_cap(k, block_k=bk, thresholds={2: 0.75})
    assert cap.tolist() == [[[2, 1]]]


def smooth_tokens(B, H, L, D, seed):
    """Video-like keys/queries: a slowly varying field plus noise, so pooling is allowed."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 6, L)
    basis = torch.randn(H, 4, D, generator=g)
    field = torch.stack([torch.sin(t * (i + 1)) for i in range(4)], -1)  # [L, 4]
    x = torch.einsum("lf,hfd->hld", field, basis)[None].expand(B, H, L, D)
    return x + 0.05 * torch.randn(B, H, L, D, generator=g)


MASK_CASES = dict(
    causal=st.booleans(),
    Lk=st.integers(100, 400),
    ratio=st.sampled_from([1, 2, 7]),
    share=st.booleans(),
    mode=st.sampled_from(["energy", "quantile"]),
    seed=st.integers(0, 10_000),
    text_len=st.integers(0, 40),
)


@SETTINGS
@given(**MASK_CASES)
def test_mask_generator_invariants(causal, Lk, ratio, share, mode, seed, text_len):
    """``build_level_map`` on the PyTorch path (where the Triton kernels do not serve)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TRITON_INTERPRET", raising=False)
        check_mask_generator_invariants(causal, Lk, ratio, share, mode, seed, text_len)


@pytest.mark.parametrize("examples", [3, pytest.param(25, marks=pytest.mark.slow)], ids=["some", "all"])
def test_mask_generator_invariants_on_the_kernels(examples):
    """The same invariants where the Triton kernels serve (CPU: Triton's interpreter, seconds an
    example; the kernels match the reference exactly on given scores, test_kernels.py)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not psa_kernels.kernels_available(device):
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")

    @settings(SETTINGS, max_examples=examples)
    @given(**MASK_CASES)
    def on_the_kernels(causal, Lk, ratio, share, mode, seed, text_len):
        check_mask_generator_invariants(causal, Lk, ratio, share, mode, seed, text_len, device=device)

    on_the_kernels()


def check_mask_generator_invariants(causal, Lk, ratio, share, mode, seed, text_len, device="cpu"):
    B, Hkv, D, bq, bk = 2, 2, 32, 32, 32
    Lq = Lk - seed % 50 if causal else Lk
    q = smooth_tokens(B, Hkv * ratio, Lq, D, seed)
    k = smooth_tokens(B, Hkv, Lk, D, seed + 1)
    pad = torch.ones(B, Lk, dtype=torch.bool)
    pad[1, : seed % 70] = False
    text = torch.zeros(B, Lk, dtype=torch.bool)
    text[:, Lk - text_len :] = text_len > 0
    q, k, pad, text = (t.to(device) for t in (q, k, pad, text))
    sim = (0.75, 0.7, 0.7)
    lm = psa_kernels.build_level_map(
        q, k, causal=causal, block_q=bq, block_k=bk, mode=mode, thresholds=(0.3, 0.5, 0.7, 0.9), similarity=sim,
        text_mask=text, share_kv_group=share, key_padding_mask=pad, min_full_fraction=0.06,
    )
    nq, nk = math.ceil(Lq / bq), math.ceil(Lk / bk)
    assert lm.dtype == torch.int8 and lm.shape == (B, Hkv if share else Hkv * ratio, nq, nk)
    assert set(lm.unique().tolist()) <= {0, 1, 2, 4, 8}
    vis = psa_kernels.block_visibility(batch=B, q_len=Lq, k_len=Lk, block_q=bq, block_k=bk, causal=causal,
                                       key_padding_mask=pad)[:, None].expand_as(lm)
    assert torch.all(lm[~vis] == 0)
    forced = psa_kernels.forced_full_blocks(batch=B, q_len=Lq, k_len=Lk, block_q=bq, block_k=bk, causal=causal,
                                            text_mask=text, key_padding_mask=pad)[:, None].expand_as(lm)
    assert torch.all(lm[forced & vis] == 1)
    # Sink and (causal) diagonal blocks at level 1.
    assert torch.all(lm[:, :, :, 0][vis[:, :, :, 0]] == 1)
    if causal:
        for i in range(nq):
            last_abs = Lk - Lq + min((i + 1) * bq, Lq) - 1
            j = last_abs // bk
            assert torch.all(lm[:, :, i, j][vis[:, :, i, j]] == 1)
    # Text rows and columns at level 1.
    if text_len:
        j0 = (Lk - text_len) // bk
        assert torch.all(lm[..., j0:][vis[..., j0:]] == 1)
    # The similarity cap holds for every pair that is not forced.
    cap = psa_kernels.similarity_cap(k, block_k=bk, thresholds=sim, key_padding_mask=pad)
    cap = cap.repeat_interleave(lm.shape[1] // Hkv, 1)[:, :, None, :].expand_as(lm)
    free = (lm > 1) & ~forced
    assert torch.all(lm[free] <= cap[free])
    # Every row with visible blocks keeps at least 6% of them at level 1.
    need = torch.ceil(0.06 * vis.sum(-1).float())
    assert torch.all((lm == 1).sum(-1) >= need)


def test_mask_generator_uses_pooling_on_smooth_inputs_and_dense_mode():
    q, k = smooth_tokens(1, 4, 512, 32, 0), smooth_tokens(1, 2, 512, 32, 1)
    lm = psa_kernels.build_level_map(q, k, causal=True, block_q=32, block_k=32, dense_tail_tokens=0,
                                     thresholds=(0.3, 0.5, 0.7, 0.9))
    levels = set(lm.unique().tolist())
    assert {2, 4, 8} & levels, levels  # pooled levels are used where keys are smooth
    assert 0 < psa_kernels.sparsity(lm, causal=True, q_len=512, k_len=512, block_q=32, block_k=32).mean() < 1
    dense = psa_kernels.build_level_map(q, k, causal=True, block_q=32, block_k=32, mode="dense")
    assert psa_kernels.sparsity(dense, causal=True, q_len=512, k_len=512, block_q=32, block_k=32).max() == 0


def test_antidiagonal_importance_is_a_distribution_per_strided_row():
    q, k = torch.randn(1, 2, 96, 32), torch.randn(1, 1, 96, 32)
    s = R.antidiagonal_importance(q, k, causal=False, block_q=32, block_k=32, stride=8)
    # Each query block holds 4 strided rows whose softmaxes each sum to 1.
    assert torch.allclose(s.sum(-1), torch.full((1, 2, 3), 4.0), atol=1e-5)
    s = R.antidiagonal_importance(q, k, causal=True, block_q=32, block_k=32, stride=8)
    assert torch.all(s[..., 0, 1:] == 0)


def test_sampled_importance_shape_and_range():
    g = torch.Generator().manual_seed(0)
    s = R.sampled_importance(torch.randn(1, 4, 100, 32), torch.randn(1, 2, 90, 32), block_q=32, block_k=32,
                             samples=4, generator=g)
    assert s.shape == (1, 4, 4, 3) and torch.all((s >= 0) & (s <= 1))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(level_map=torch.full((1, 2, 2, 2), 3, dtype=torch.int8)), "outside"),
        (lambda a: a.update(level_map=torch.ones(1, 3, 2, 2, dtype=torch.int8)), "heads"),
        (lambda a: a.update(level_map=torch.ones(1, 2, 3, 2, dtype=torch.int8)), "ceil"),
        (lambda a: a.update(level_map=torch.ones(1, 2, 2, 2)), "integer"),
        (lambda a: a.update(k=torch.randn(1, 3, 64, 32)), "multiple"),
        (lambda a: a.update(block_k=12), "multiple of 8"),
        (lambda a: a.update(key_padding_mask=torch.ones(1, 64)), "bool"),
        (lambda a: a.update(key_padding_mask=torch.ones(1, 60, dtype=torch.bool)), "shape"),
    ],
)
def test_bad_inputs_name_the_problem(mutate, message):
    args = dict(q=torch.randn(1, 4, 64, 32), k=torch.randn(1, 2, 64, 32), v=torch.randn(1, 2, 64, 32),
                level_map=torch.ones(1, 2, 2, 2, dtype=torch.int8), block_k=32, key_padding_mask=None)
    mutate(args)
    if args["k"].shape[1] == 3:
        args["v"] = torch.randn(1, 3, 64, 32)
    with pytest.raises(ValueError, match=message):
        psa_kernels.psa_attention(args["q"], args["k"], args["v"], args["level_map"], block_q=32,
                                  block_k=args["block_k"], key_padding_mask=args["key_padding_mask"])


# ------------------------------------------------------------------------------------------
# The budget-aware assignment (mode "budget")
# ------------------------------------------------------------------------------------------


def _budget_case(seed, nk=24, rows=6):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(1, 1, rows, nk, generator=g) ** 3  # a few important blocks per row
    visible = torch.ones(1, 1, rows, nk, dtype=torch.bool)
    visible[..., rows // 2:, nk // 2:] = False  # rows that see only half the blocks
    forced = torch.zeros_like(visible)
    forced[..., 0] = True
    sims = torch.rand(1, 1, 1, nk, 3, generator=g) * 1.2 - 0.1
    return scores, visible, forced, sims


def _kept(level_map, scores, fidelity):
    r = torch.tensor([0, 0, 1, 0, 2, 0, 0, 0, 3])[level_map.long()]
    q = torch.gather(fidelity.expand(*scores.shape, 4), -1, r[..., None])[..., 0]
    return torch.where(level_map > 0, scores * q, torch.zeros_like(scores)).sum(-1)


def _cost(level_map):
    lm = level_map.float()
    return torch.where(lm > 0, 1.0 / lm.clamp(min=1), torch.zeros_like(lm)).sum(-1)


@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
def test_budget_policy_spends_at_most_its_budget_and_uses_more_of_it_when_given_more(sparsity):
    scores, visible, forced, sims = _budget_case(int(torch.seed() % 2**31))
    fidelity = R.pooling_fidelity(sims, (1, 2, 4, 8))
    lm = R.assign_budget(scores, visible, forced, fidelity, sparsity=sparsity)
    assert torch.all(lm[forced & visible] == 1) and torch.all(lm[~visible] == 0)
    budget = (1 - sparsity) * visible.sum(-1).float()
    assert torch.all(_cost(lm) <= torch.maximum(budget, forced.sum(-1).float()) + 1e-6)
    looser = R.assign_budget(scores, visible, forced, fidelity, sparsity=sparsity / 2)
    assert torch.all(_kept(looser, scores, fidelity) >= _kept(lm, scores, fidelity) - 1e-6)
    assert torch.all(_cost(looser) >= _cost(lm) - 1e-6)


def test_budget_policy_with_level_one_only_is_binary_top_k():
    scores, visible, forced, sims = _budget_case(int(torch.seed() % 2**31), nk=32, rows=4)
    visible[:] = True
    lm = R.assign_budget(scores, visible, forced, R.pooling_fidelity(sims, (1,)), sparsity=0.75)
    assert set(lm.unique().tolist()) <= {0, 1}
    for row in range(4):
        chosen = set(torch.nonzero(lm[0, 0, row]).flatten().tolist())
        free = [j for j in torch.argsort(scores[0, 0, row], descending=True).tolist() if j != 0]
        assert chosen == {0, *free[: len(chosen) - 1]}  # the sink, then the best blocks by importance
        assert len(chosen) == 8  # the budget: a quarter of 32 blocks


def test_budget_policy_keeps_a_peak_at_level_one_and_spreads_coarse_levels_over_flat_importance():
    nk = 32
    visible = torch.ones(1, 1, 2, nk, dtype=torch.bool)
    forced = torch.zeros_like(visible)
    scores = torch.full((1, 1, 2, nk), 1.0)
    scores[0, 0, 0, 7] = 200.0  # row 0: one block holds most of the attention (a needle)
    sims = torch.full((1, 1, 1, nk, 3), 0.9)  # keys alike inside every block: pooling keeps much
    lm = R.assign_budget(scores, visible, forced, R.pooling_fidelity(sims, (1, 2, 4, 8)), sparsity=0.9)
    assert lm[0, 0, 0, 7] == 1  # the peak is read at full resolution
    flat = lm[0, 0, 1]
    binary = R.assign_budget(scores, visible, forced, R.pooling_fidelity(sims, (1,)), sparsity=0.9)[0, 0, 1]
    assert (flat > 0).sum() > 2 * (binary > 0).sum()  # flat row: coverage through coarse levels
    assert set(flat[flat > 0].tolist()) <= {2, 4, 8}
    # Dissimilar keys (nothing survives pooling): the budget goes to level 1, as binary would.
    dissimilar = torch.full((1, 1, 1, nk, 3), -0.2)
    lm = R.assign_budget(scores, visible, forced, R.pooling_fidelity(dissimilar, (1, 2, 4, 8)), sparsity=0.9)
    assert set(lm.unique().tolist()) <= {0, 1}


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95])
def test_budget_policy_reads_its_top_ranked_blocks_at_level_one_first(sparsity):
    """With ``b`` the budget left after the forced blocks, the free blocks ranked ``t = 0, 1, ...``
    (importance descending) are at level 1 while ``t < budget_full_share * b``, ``t + 1 <= b``
    and their importance is above the free blocks' mean: at least the top free block whenever
    ``b >= 1``. They are the blocks binary top-k at the same budget reads first, so on a row
    whose weight sits on its best-ranked blocks (a peak that pooling averages away) the policy
    keeps what top-k keeps with that share of the budget."""
    scores, visible, forced, sims = _budget_case(int(torch.seed() % 2**31), nk=32, rows=8)
    fidelity = R.pooling_fidelity(sims, (1, 2, 4, 8))
    for share in (0.25, 0.5, 1.0):
        lm = R.assign_budget(scores, visible, forced, fidelity, sparsity=sparsity, full_share=share)
        binary = R.assign_budget(scores, visible, forced, R.pooling_fidelity(sims, (1,)), sparsity=sparsity)
        budget = (1 - sparsity) * visible.sum(-1).float() - forced.sum(-1).float()
        assert torch.all(_cost(lm) <= torch.maximum(budget, torch.zeros_like(budget)) + forced.sum(-1) + 1e-6)
        for row in range(scores.shape[2]):
            b = float(budget[0, 0, row])
            free = (visible & ~forced)[0, 0, row]
            ranked = [j for j in torch.argsort(scores[0, 0, row], descending=True).tolist() if free[j]]
            mean = float(scores[0, 0, row][free].mean())
            first = [j for t, j in enumerate(ranked) if t < share * b and t + 1 <= b and scores[0, 0, row, j] > mean]
            assert all(lm[0, 0, row, j] == 1 for j in first), (share, row)
            assert all(binary[0, 0, row, j] == 1 for j in first)  # top-k's own first blocks
            if b >= 1:
                assert lm[0, 0, row, ranked[0]] == 1  # the row's top free block (it is above the mean)


def test_budget_policy_reads_a_flattened_peak_at_full_resolution():
    """The V-NIAH failure of the optimiser alone (``budget_full_share=0``): keys alike (pooling
    looks nearly free) and an importance estimate that shows the needle's block barely above the
    others (averaged logits flatten a peak). With a budget of 1.3 blocks the optimiser buys ten
    8x-pooled blocks and pools the needle away; the first step reads it at level 1 and spends
    the rest on pooled coverage."""
    nk = 33
    visible = torch.ones(1, 1, 1, nk, dtype=torch.bool)
    forced = torch.zeros_like(visible)
    forced[..., 0] = forced[..., -1] = True  # the sink and the diagonal
    scores = torch.full((1, 1, 1, nk), 0.02)
    scores[..., 22] = 0.04  # the needle's block, ranked first among the free blocks
    sims = torch.full((1, 1, 1, nk, 3), 0.99)
    fidelity = R.pooling_fidelity(sims, (1, 2, 4, 8))
    alone = R.assign_budget(scores, visible, forced, fidelity, sparsity=0.9, full_share=0.0)[0, 0, 0]
    assert alone[22] == 8 and (alone == 8).sum() == 10  # pooled with nine others
    lm = R.assign_budget(scores, visible, forced, fidelity, sparsity=0.9)[0, 0, 0]
    assert lm[22] == 1 and (lm == 1).sum() == 3 and (lm == 8).sum() == 2  # the needle, then coverage
    assert _cost(lm) <= 0.1 * nk + 1e-6


def test_budget_fidelity_reads_the_least_similar_pair():
    """Keys alike except one (a needle) in block 5: the block's mean pair similarity stays high
    (one dissimilar pair among 16, 8, 4), its least similar pair's is about 0. With a budget of
    one free block and the optimiser alone (``budget_full_share=0``), the mean would pool the
    needle's block (it looks nearly free to pool); the least similar pair, which
    ``build_level_map`` reads by default, puts it at level 1."""
    g = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    D, L, bk = 16, 256, 32
    e = torch.randn(D, generator=g)
    k = e.expand(1, 1, L, D).clone() + 0.01 * torch.randn(1, 1, L, D, generator=g)
    needle = torch.randn(D, generator=g)
    k[0, 0, 5 * bk + 8] = needle - (needle @ e) / (e @ e) * e  # orthogonal to the other keys
    mean = R.block_similarity(k, block_k=bk)
    least = R.block_similarity(k, block_k=bk, reduce="min")
    assert torch.all(least <= mean + 1e-6) and torch.all(least[0, 0, 5].abs() < 0.1) and torch.all(mean[0, 0, 5] > 0.7)
    others = torch.arange(8) != 5
    assert torch.all(least[0, 0, others] > 0.99)
    q = torch.randn(1, 1, 32, D, generator=g)
    scores = torch.full((1, 1, 1, 8), 0.01)
    scores[..., 0], scores[..., 5] = 1.0, 0.3  # the sink, and the needle's block
    kw = dict(block_q=32, block_k=bk, mode="budget", target_sparsity=0.75, scores=scores, similarity=None,
              dense_tail_tokens=0, min_full_fraction=0.0, budget_full_share=0.0)
    assert R.build_level_map(q, k, **kw)[0, 0, 0, 5] == 1
    assert R.build_level_map(q, k, block_min_sims=least, **kw)[0, 0, 0, 5] == 1
    assert R.build_level_map(q, k, block_min_sims=mean, **kw)[0, 0, 0, 5] > 1  # the mean pools it
    with pytest.raises(ValueError, match="reduce"):
        R.block_similarity(k, block_k=bk, reduce="max")


def test_budget_mode_in_the_mask_generator_and_its_errors():
    g = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    q, k = torch.randn(1, 4, 600, 32, generator=g), torch.randn(1, 2, 600, 32, generator=g)
    lm = R.build_level_map(q, k, causal=True, block_q=64, block_k=32, mode="budget", target_sparsity=0.8,
                           dense_tail_tokens=0, min_full_fraction=0.0)
    sparsity = psa_kernels.sparsity(lm, causal=True, q_len=600, k_len=600, block_q=64, block_k=32)
    assert torch.all(sparsity >= 0.8 - 0.08)  # forced blocks (sink, diagonal) may spend a little more
    with pytest.raises(ValueError, match="target_sparsity"):
        R.build_level_map(q, k, mode="budget")
    with pytest.raises(ValueError, match="level 1"):
        R.build_level_map(q, k, mode="budget", target_sparsity=0.5, levels=(2, 4), thresholds=(0.5, 0.9))
    with pytest.raises(ValueError, match="assign_budget"):
        R.assign_levels(torch.rand(1, 1, 2, 4), torch.ones(1, 1, 2, 4, dtype=torch.bool), mode="budget")
    for bad in (1.5, -0.25, True, "half"):
        with pytest.raises(ValueError, match="budget_full_share"):
            R.build_level_map(q, k, mode="budget", target_sparsity=0.5, budget_full_share=bad)
        with pytest.raises(ValueError, match="budget_full_share"):
            psa_kernels.build_level_map(q, k, mode="budget", target_sparsity=0.5, budget_full_share=bad)
