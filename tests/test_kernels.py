"""Triton kernels against the dense reference (CPU: Triton's interpreter; GPU: compiled).

Inputs are drawn fresh for every run (the seed is in each assertion message); the matrix covers
direction x GQA ratio x head_dim x block_k (every pair of values in every run, the whole product
under ``-m slow``) with lengths that are not block multiples, causal queries shorter than the
keys, left padding, and empty/full/mixed level-map rows.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import psa_kernels
from psa_kernels import LevelMap, blocks, reference

pytest.importorskip("triton")
from psa_kernels.attention import psa_attention_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not psa_kernels.kernels_available(DEVICE),
                                reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
TOL = 2e-3  # ||out - ref|| / ||ref|| in fp32
LEVELS = torch.tensor([0, 1, 2, 4, 8], dtype=torch.int8)


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30)).item()


def make_case(seed, *, B, Hq, Hkv, Lq, Lk, D, block_q, block_k, padded, rows="mixed", heads=None,
              dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(DEVICE, dtype)
    pad = None
    if padded:  # left padding; the last sequence keeps every token
        starts = torch.randint(0, Lk // 2 + 1, (B,), generator=g)
        starts[-1] = 0
        pad = (torch.arange(Lk)[None, :] >= starts[:, None]).to(DEVICE)
    shape = (B, heads or Hq, math.ceil(Lq / block_q), math.ceil(Lk / block_k))
    if rows == "full":
        lm = torch.ones(shape, dtype=torch.int8)
    elif rows == "pooled":  # no pair at level 1
        lm = LEVELS[torch.randint(2, 5, shape, generator=g)]
    elif rows == "empty":
        lm = torch.zeros(shape, dtype=torch.int8)
    else:  # random levels, plus one empty row and one full row per map
        lm = LEVELS[torch.randint(0, 5, shape, generator=g)]
        lm[:, 0, 0] = 0
        lm[:, -1, -1] = 1
    return q, k, v, lm.to(DEVICE), pad


def check(seed, causal, block_q, block_k, **shape):
    q, k, v, lm, pad = make_case(seed, block_q=block_q, block_k=block_k, **shape)
    kw = dict(causal=causal, block_q=block_q, block_k=block_k, key_padding_mask=pad)
    out = psa_attention_triton(q, k, v, lm, **kw)
    ref = reference.psa_attention(q.double(), k.double(), v.double(), lm, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), f"seed {seed}"
    err = rel_err(out, ref)
    if ref.norm() == 0:
        assert out.abs().max() == 0, f"seed {seed}"
    else:
        assert err < TOL, f"seed {seed}: relative error {err:.2e}"
    return out, ref


RATIOS, HEAD_DIMS, BLOCK_KS = (1, 2, 7), (64, 80, 128), (32, 64, 128)


def _matrix():
    """Every (direction, GQA ratio, head_dim, block_k). Every run takes the 9 rows of an
    orthogonal array, which hold every pair of values of any two of the four at least once (rows
    a = c - b, d = c + b mod 3 over the value indices b, c of ratio and head_dim; direction causal
    where a = 1, block_k index d); the other 45 run under ``-m slow`` (seconds each in Triton's
    interpreter)."""
    cases = []
    for causal in (False, True):
        for b, ratio in enumerate(RATIOS):
            for c, D in enumerate(HEAD_DIMS):
                for block_k in BLOCK_KS:
                    pairwise = causal == ((c - b) % 3 == 1) and block_k == BLOCK_KS[(c + b) % 3]
                    cases.append(pytest.param(causal, ratio, D, block_k, marks=() if pairwise else pytest.mark.slow,
                                              id=f"{'causal' if causal else 'bidirectional'}-{ratio}-{D}-{block_k}"))
    return cases


@pytest.mark.parametrize("causal, ratio, D, block_k", _matrix())
def test_matrix_against_reference(causal, ratio, D, block_k):
    seed = fresh_seed()
    rnd = random.Random(seed)
    block_q = rnd.choice([64, 128])
    Lk = rnd.randrange(2 * block_k + 1, 4 * block_k) | 1  # odd: never a block multiple
    Lq = rnd.randrange(block_q // 2, Lk) if causal else rnd.randrange(block_q + 1, 2 * block_q + 40) | 1
    heads = rnd.choice([ratio, 1])  # level map per query head or per kv head
    padded = rnd.random() < 0.5  # unpadded inputs take the kernel's unmasked fast path for whole tiles
    check(seed, causal, block_q, block_k, B=2, Hq=ratio, Hkv=1, Lq=Lq, Lk=Lk, D=D, padded=padded, heads=heads)


@pytest.mark.parametrize("scale", [0.31, -0.2, 0.0])
def test_given_scales_match_the_reference(scale):
    """A caller's softmax scale, negative and zero included: unmasked tiles take the row maximum
    of the raw products before scaling, which holds only for a positive scale (the wrapper
    negates q for a negative one). Unpadded and causal, so whole blocks take the unmasked loop."""
    seed = fresh_seed()
    q, k, v, lm, _ = make_case(seed, B=1, Hq=4, Hkv=2, Lq=300, Lk=300, D=64, block_q=64, block_k=64, padded=False)
    kw = dict(causal=True, scale=scale, block_q=64, block_k=64)
    out = psa_attention_triton(q, k, v, lm, **kw)
    ref = reference.psa_attention(q.double(), k.double(), v.double(), lm, **kw)
    assert torch.isfinite(out).all() and rel_err(out, ref) < TOL, f"seed {seed}: {rel_err(out, ref):.2e}"


LAUNCH_VARIANTS = {
    "small-tiles": dict(block_m=32, block_n=32),
    "narrow": dict(block_n=16),
    "kv-chunk-1": dict(kv_chunk=1),  # the program order of long sequences: one (batch, kv head) at a time
}


@pytest.mark.parametrize("kv_chunk", [1, 2])
def test_program_order_chunks_across_batch_and_kv_heads(kv_chunk):
    """Chunks of the program order that split a batch row's kv heads (1) or span two batch rows'
    worth of pairs (2 of 4): every (batch, head, query tile) is computed once and right."""
    seed = fresh_seed()
    q, k, v, lm, pad = make_case(seed, B=2, Hq=4, Hkv=2, Lq=150, Lk=211, D=64, block_q=64, block_k=64, padded=True)
    kw = dict(causal=True, block_q=64, block_k=64, key_padding_mask=pad)
    out = psa_attention_triton(q, k, v, lm, kv_chunk=kv_chunk, **kw)
    ref = reference.psa_attention(q.double(), k.double(), v.double(), lm, **kw)
    assert torch.isfinite(out).all() and rel_err(out, ref) < TOL, f"seed {seed}: {rel_err(out, ref):.2e}"
    for bad in (3, 0):
        with pytest.raises(ValueError, match="must divide"):
            psa_attention_triton(q, k, v, lm, kv_chunk=bad, **kw)


def test_program_order_chunks_fit_the_l2_share():
    from psa_kernels.attention import L2_SHARE_BYTES, kv_chunk_for

    per_token = 128 * 2  # D = 128, bf16
    assert kv_chunk_for(4, 8192 * per_token) == 4  # 7B shape at 8k: every head together
    assert kv_chunk_for(4, 65536 * per_token) == 1  # at 64k: one kv head at a time
    assert kv_chunk_for(6, 16384 * per_token) == 3  # a divisor of the pairs, as many as fit
    assert kv_chunk_for(5, 1 << 40) == 1
    for pairs in (1, 4, 7, 12):
        for length in (1024, 30000, 300000):
            c = kv_chunk_for(pairs, length * per_token)
            assert pairs % c == 0 and (c == 1 or c * 2 * length * per_token * 15 // 8 <= L2_SHARE_BYTES)


@pytest.mark.parametrize("launch", LAUNCH_VARIANTS.values(), ids=LAUNCH_VARIANTS.keys())
def test_launch_variants_compute_the_same(launch):
    """Every launch the tuning sweep may choose (other tile shapes, so other boxes per level and
    gathered tiles where a block holds fewer keys than a tile) computes the reference's output. The logits grow along the keys (key norms ramp up 6x) so
    that a row's maximum keeps rising and the accumulator's rescaling matters."""
    seed = fresh_seed()
    rnd = random.Random(seed)
    for causal in (False, True):
        Lk = rnd.randrange(130, 260) | 1
        Lq = rnd.randrange(40, Lk) if causal else rnd.randrange(70, 200)
        q, k, v, lm, pad = make_case(seed, B=2, Hq=7, Hkv=1, Lq=Lq, Lk=Lk, D=80, block_q=64, block_k=64,
                                     padded=rnd.random() < 0.5)
        q = q * 3.0
        k = k * torch.linspace(0.5, 3.0, Lk, device=k.device)[:, None]
        kw = dict(causal=causal, block_q=64, block_k=64, key_padding_mask=pad)
        out = psa_attention_triton(q, k, v, lm, **kw, **launch)
        ref = reference.psa_attention(q.double(), k.double(), v.double(), lm, **kw)
        assert torch.isfinite(out).all() and rel_err(out, ref) < TOL, f"seed {seed}, causal={causal}"


@pytest.mark.parametrize("rows", ["full", "pooled", "empty"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_full_pooled_and_empty_maps(causal, rows):
    seed = fresh_seed()
    out, ref = check(seed, causal, 64, 32, B=2, Hq=4, Hkv=2, Lq=90, Lk=131, D=64, padded=True, rows=rows)
    if rows == "empty":
        assert torch.all(out == 0)
    if rows == "full":  # all pairs at level 1 is dense attention
        q, k, v, _, pad = make_case(seed, B=2, Hq=4, Hkv=2, Lq=90, Lk=131, D=64, block_q=64, block_k=32,
                                    padded=True)
        dense = psa_kernels.dense_attention(q, k, v, causal=causal, key_padding_mask=pad)
        assert rel_err(out, dense) < TOL


@pytest.mark.parametrize("L", [256, 320])
def test_causal_square_multiple_of_16_without_padding(L):
    # The shape where a compiler's alignment analysis once broke the causal mask on an H100.
    seed = fresh_seed()
    check(seed, True, 64, 32, B=1, Hq=4, Hkv=2, Lq=L, Lk=L, D=64, padded=False, rows="full")
    check(seed, True, 128, 128, B=1, Hq=2, Hkv=1, Lq=L, Lk=L, D=128, padded=False)


def test_rows_with_no_visible_key_are_zero():
    seed = fresh_seed()
    q, k, v, _, _ = make_case(seed, B=2, Hq=2, Hkv=1, Lq=64, Lk=64, D=32, block_q=64, block_k=32, padded=False)
    pad = torch.ones(2, 64, dtype=torch.bool, device=DEVICE)
    pad[0, :40] = False  # causal rows 0..39 of sequence 0 see only padding
    lm = torch.ones(2, 2, 1, 2, dtype=torch.int8, device=DEVICE)
    out = psa_attention_triton(q, k, v, lm, causal=True, block_q=64, block_k=32, key_padding_mask=pad)
    assert torch.isfinite(out).all() and torch.all(out[0, :, :40] == 0) and out[0, :, 40:].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    seed = fresh_seed()
    q, k, v, lm, pad = make_case(seed, B=1, Hq=4, Hkv=2, Lq=100, Lk=150, D=80, block_q=64, block_k=32,
                                 padded=True, dtype=dtype)
    kw = dict(causal=True, block_q=64, block_k=32, key_padding_mask=pad)
    out = psa_kernels.psa_attention(q, k, v, lm, **kw)
    ref = reference.psa_attention(q.double(), k.double(), v.double(), lm, **kw)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-2, f"seed {seed}"


def test_public_entry_point_dispatches_to_the_kernel(monkeypatch):
    import psa_kernels.attention as attention

    calls = []
    real = attention.psa_attention_triton
    monkeypatch.setattr(attention, "psa_attention_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, lm, _ = make_case(fresh_seed(), B=1, Hq=2, Hkv=1, Lq=40, Lk=40, D=32, block_q=64, block_k=32,
                               padded=False)
    psa_kernels.psa_attention(q, k, v, lm, block_q=64, block_k=32)
    assert calls == [1]
    psa_kernels.psa_attention(q.double(), k.double(), v.double(), lm, block_q=64, block_k=32)  # fp64: reference
    assert calls == [1]
    # A LevelMap is accepted as well as the dense map.
    compact = LevelMap.from_dense(lm, block_q=64, block_k=32)
    assert torch.equal(psa_kernels.psa_attention(q, k, v, compact, block_q=64, block_k=32),
                       psa_kernels.psa_attention(q, k, v, lm, block_q=64, block_k=32))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    causal=st.booleans(),
    hkv=st.integers(1, 2),
    ratio=st.sampled_from([1, 2, 7]),
    D=st.sampled_from([32, 48, 64, 80, 96, 128]),
    block_q=st.sampled_from([16, 32, 64]),
    block_k=st.sampled_from([8, 16, 32, 64, 128]),
    Lk=st.integers(1, 260),
    frac=st.floats(0.05, 1.0),
    padded=st.booleans(),
    per_kv=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_shapes_and_maps(causal, hkv, ratio, D, block_q, block_k, Lk, frac, padded, per_kv, seed):
    Lq = max(1, int(Lk * frac)) if causal else max(1, int(260 * frac))
    check(seed, causal, block_q, block_k, B=2, Hq=hkv * ratio, Hkv=hkv, Lq=Lq, Lk=Lk, D=D, padded=padded,
          heads=hkv if per_kv else hkv * ratio)


@pytest.mark.parametrize("Lk", [1, 7, 9, 203, 262])
def test_pyramid_kernel_matches_reference(Lk):
    # Lengths around the 8-token groups and the programs' 128-token spans, left padding.
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, 3, Lk, 80, generator=g).to(DEVICE)
    v = torch.randn(2, 3, Lk, 80, generator=g).to(DEVICE)
    pad = torch.ones(2, Lk, dtype=torch.bool, device=DEVICE)
    pad[1, :min(45, Lk - 1)] = False
    got = psa_kernels.build_pyramid(k, v, pad)
    want = reference.build_pyramid(k, v, pad)
    for p in (1, 2, 4, 8):
        assert torch.equal(got[p].counts.long(), want[p].counts.long()), (p, seed)
        assert torch.equal(got[p].last.long(), want[p].last.long()), (p, seed)
        used = (want[p].counts > 0)[:, None, :, None]  # groups with no valid token are never read
        assert rel_err(got[p].keys * used, want[p].keys * used) < 1e-6, (p, seed)
        assert rel_err(got[p].values * used, want[p].values * used) < 1e-6, (p, seed)


def test_level_map_layout_round_trips_and_groups_by_level():
    g = torch.Generator().manual_seed(fresh_seed())
    lm = LEVELS[torch.randint(0, 5, (2, 3, 4, 9), generator=g)]
    layout = LevelMap.from_dense(lm, block_q=64, block_k=32)
    assert torch.equal(dataclasses.replace(layout, dense=None).to_dense(), lm)  # decoded from the lists
    for r, p in enumerate((1, 2, 4, 8)):
        assert torch.equal(layout.counts[..., r].long(), (lm == p).sum(-1))
    # Row (0, 0, 0): level lists in order 1, 2, 4, 8, ascending inside each.
    row = lm[0, 0, 0]
    expected = [j for p in (1, 2, 4, 8) for j in range(9) if row[j] == p]
    assert layout.indices[0, 0, 0, : len(expected)].tolist() == expected


@pytest.mark.parametrize("precision", ["full", "fp8"])
@pytest.mark.parametrize("stride", [4, 8, 16])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_antidiagonal_importance_kernel_matches_reference(causal, stride, precision):
    from psa_kernels.importance import antidiagonal_importance_triton

    seed = fresh_seed()
    rnd = random.Random(seed)
    block_q, block_k = rnd.choice([64, 128]), rnd.choice([32, 64, 128])
    Lk = rnd.randrange(block_k + 1, 3 * block_k + 50)
    Lq = rnd.randrange(min(block_q // 2, Lk), Lk + 1) if causal else rnd.randrange(20, 300)
    ratio = rnd.choice([1, 2, 7])
    q, k, _, _, pad = make_case(seed, B=2, Hq=ratio, Hkv=1, Lq=Lq, Lk=Lk, D=rnd.choice([64, 80]), block_q=block_q,
                                block_k=block_k, padded=rnd.random() < 0.5)
    kw = dict(causal=causal, block_q=block_q, block_k=block_k, stride=stride, key_padding_mask=pad,
              precision=precision)
    # Small row tiles and few persistent programs: several row tiles per head, each program
    # reusing its scratch strip for several tiles.
    # kv_chunk 1 (one (batch, kv head) pair at a time) or 2 (both batch rows' pairs interleaved,
    # the default here): the program order changes, the result must not.
    got = antidiagonal_importance_triton(q, k, **kw, block_r=rnd.choice([16, 32, 128]), programs=rnd.choice([1, 3]),
                                         kv_chunk=rnd.choice([1, 2]))
    want = reference.antidiagonal_importance(q.double(), k.double(), **kw)
    assert rel_err(got, want) < 1e-4, f"seed {seed}"
    # The public entry dispatches to the kernel (the default launch: another tile shape sums in
    # another order on a GPU, so only the same launch is bit-equal).
    assert torch.equal(psa_kernels.antidiagonal_importance(q, k, **kw), antidiagonal_importance_triton(q, k, **kw))
    if precision == "fp8":  # the fp8 estimate is an estimate of the same scores
        full = reference.antidiagonal_importance(q.double(), k.double(), **{**kw, "precision": "full"})
        assert rel_err(got, full) < 0.1, f"seed {seed}"


@pytest.mark.parametrize("precision", ["full", "fp8"])
def test_importance_with_given_scales_matches_the_reference(precision):
    """The kernel applies the row's scale inside the exponent after the row max, which needs a
    scale >= 0: a negative scale negates q in the wrapper, and scale 0 (every logit 0) must give
    uniform rows, not NaN from -inf * 0 on masked columns."""
    from psa_kernels.importance import antidiagonal_importance_triton

    seed = fresh_seed()
    q, k, _, _, pad = make_case(seed, B=2, Hq=2, Hkv=1, Lq=200, Lk=200, D=64, block_q=64, block_k=32, padded=True)
    # On a GPU the fp32 products are TF32 and Hopper's fp8 products accumulate in reduced precision:
    # at scale 0.7 (5.6x the default) an H100 read relative errors of 1.0-2.2e-4 over five seeds,
    # 3-4e-5 at the default (benchmarks/results/tune_importance_h100_occupancy/
    # importance_scale_error_h100.txt). The mistakes this test guards (a negative scale not
    # negated, NaN at scale 0) are errors of order 1.
    tol = 1e-4 if DEVICE == "cpu" else 1e-3
    for scale in (-0.3, 0.0, 0.7):
        kw = dict(causal=True, block_q=64, block_k=32, stride=8, key_padding_mask=pad, precision=precision,
                  scale=scale)
        got = antidiagonal_importance_triton(q, k, **kw)
        want = reference.antidiagonal_importance(q.double(), k.double(), **kw)
        assert torch.isfinite(got).all(), f"seed {seed}, scale {scale}"
        err = rel_err(got, want)
        assert err < tol, f"seed {seed}, scale {scale}: relative error {err:.2e}"


def test_importance_kv_chunk_must_divide_the_pairs():
    from psa_kernels.importance import antidiagonal_importance_triton

    g = torch.Generator().manual_seed(fresh_seed())
    q = torch.randn(1, 4, 64, 16, generator=g).to(DEVICE)
    k = torch.randn(1, 2, 64, 16, generator=g).to(DEVICE)
    for bad in (0, 3):
        with pytest.raises(ValueError, match="kv_chunk"):
            antidiagonal_importance_triton(q, k, causal=True, block_q=32, block_k=32, kv_chunk=bad)


def test_fp8_copies_match_the_reference_quantisation_bit_for_bit():
    """kernels/importance.quantize_groups against reference.quantize_fp8_rows: values spanning
    many magnitudes (subnormal e4m3 included), exact ties, a group of zeros, padded keys."""
    from psa_kernels.importance import quantize_groups
    from psa_kernels.reference import _strided_keys, _strided_queries, quantize_fp8_rows

    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, H, L, D, S = 2, 3, 203, 80, 8
    x = torch.randn(B, H, L, D, generator=g) * torch.exp2(torch.randint(-12, 12, (B, H, L, 1), generator=g).float())
    x[0, 0, :5] = torch.tensor([1.0625, 1.1875, 0.0, 3.25, 2.0 ** -9 * 1.5])[:, None]  # ties and tiny values
    x[1, 2, 8:16] = 0.0  # a group of zeros
    pad = torch.ones(B, L, dtype=torch.bool)
    pad[1, :37] = False
    for reverse, mask in ((True, None), (False, pad)):
        got, scale = quantize_groups(x.to(DEVICE), S, reverse=reverse, key_padding_mask=None if mask is None else
                                     mask.to(DEVICE))
        block_d = got.shape[-1] // S
        deq = (got.float().view(B, H, -1, S, block_d)[..., :D] * scale[..., None, None]).reshape(B, H, -1, S * D)
        xs = x * mask[:, None, :, None] if mask is not None else x
        strided = (_strided_queries if reverse else _strided_keys)(xs.double(), S)
        want = quantize_fp8_rows(strided)
        assert torch.equal(deq.double().cpu(), want), f"seed {seed}, reverse={reverse}"
        if mask is not None:  # groups holding no real key are marked with scale 0
            real = torch.nn.functional.pad(mask, (0, -L % S)).view(B, -1, S).any(-1)
            assert torch.equal(scale.cpu() > 0, real[:, None, :].expand_as(scale)), f"seed {seed}"


def test_one_launch_quantises_queries_and_keys_of_different_shapes():
    """kernels/importance.quantize_qk (both copies in one launch) against the reference, with more
    query heads than kv heads, fewer queries than keys (so a different number of groups per
    side) and left padding on the keys only."""
    from psa_kernels.importance import quantize_qk
    from psa_kernels.reference import _strided_keys, _strided_queries, quantize_fp8_rows

    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, Lq, Lk, D, S = 2, 6, 2, 45, 203, 80, 8
    q = torch.randn(B, Hq, Lq, D, generator=g) * 3
    k = torch.randn(B, Hkv, Lk, D, generator=g) / 5
    pad = torch.ones(B, Lk, dtype=torch.bool)
    pad[1, :21] = False
    q8, sq, k8, sk = quantize_qk(q.to(DEVICE), k.to(DEVICE), S, key_padding_mask=pad.to(DEVICE))
    assert q8.shape[:3] == (B, Hq, -(-Lq // S)) and k8.shape[:3] == (B, Hkv, -(-Lk // S)), f"seed {seed}"
    for got, scale, want in ((q8, sq, quantize_fp8_rows(_strided_queries(q.double(), S))),
                             (k8, sk, quantize_fp8_rows(_strided_keys((k * pad[:, None, :, None]).double(), S)))):
        block_d = got.shape[-1] // S
        H = got.shape[1]
        deq = (got.float().view(B, H, -1, S, block_d)[..., :D] * scale[..., None, None]).reshape(B, H, -1, S * D)
        assert torch.equal(deq.double().cpu(), want), f"seed {seed}"
    assert (sk[1, :, :2] == 0).all() and (sk[1, :, 3:] > 0).all(), f"seed {seed}: padded key groups keep scale 0"


def test_public_mask_generator_agrees_with_the_reference():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 6, 400)
    field = torch.stack([torch.sin(t * (i + 1)) for i in range(4)], -1)
    q = (field @ torch.randn(4, 64, generator=g) + 0.1 * torch.randn(1, 4, 400, 64, generator=g)).to(DEVICE)
    k = (field @ torch.randn(4, 64, generator=g) + 0.1 * torch.randn(1, 2, 400, 64, generator=g)).to(DEVICE)
    kw = dict(causal=True, block_q=64, block_k=32, thresholds=(0.3, 0.5, 0.7, 0.9), dense_tail_tokens=0)
    got = psa_kernels.build_level_map(q, k, **kw)
    want = reference.build_level_map(q.double(), k.double(), **kw)
    # Importance differs by rounding only; a block sitting exactly on a threshold may flip.
    assert (got == want).float().mean() > 0.98, f"seed {seed}"
    assert {2, 4, 8} & set(got.unique().tolist())


@pytest.mark.parametrize("case", range(6))
def test_fused_assignment_matches_the_reference_exactly(case):
    """kernels/assign.py against reference.build_level_map on the same scores: every option
    (energy/quantile, shared GQA map, similarity cap, text tail, padding, causal with Lq < Lk,
    fewer than four levels). Scores are multiples of 1/1024, so every sum is exact in fp32 and
    the maps must agree bit for bit, dense and compact."""
    seed, rnd, g, (B, Hkv, G, Hq, bq, bk, Lq, Lk, causal), (q, k), (nq, nk) = _random_assign_case()
    scores = (torch.randint(0, 1000, (B, Hq, nq, nk), generator=g).float() / 1024).to(DEVICE)
    scores[0, 0, 0] = 0.0  # a row with no mass: uniform over its visible blocks
    pad = None
    if rnd.random() < 0.5:
        pad = torch.ones(B, Lk, dtype=torch.bool)
        pad[1, : rnd.randrange(1, Lk // 2)] = False
        pad = pad.to(DEVICE)
    n_levels = rnd.choice([2, 4])
    kw = dict(causal=causal, block_q=bq, block_k=bk, scores=scores, key_padding_mask=pad,
              mode=rnd.choice(["energy", "quantile"]), share_kv_group=rnd.random() < 0.5,
              similarity=rnd.choice([None, (0.1, 0.0, -0.1)]), dense_tail_tokens=rnd.choice([0, 40]),
              min_full_fraction=rnd.choice([0.06, 0.3]), levels=(1, 2, 4, 8)[:n_levels],
              thresholds=(0.3, 0.5, 0.7, 0.9)[:n_levels])
    got = psa_kernels.build_level_map(q, k, compact=True, **kw)
    want = reference.build_level_map(q, k, **kw)
    expected = LevelMap.from_dense(want, block_q=bq, block_k=bk, q_len=Lq, k_len=Lk, causal=causal,
                                   key_padding_mask=pad)
    assert got.dense is None  # the compact form alone: the attention reads only the lists
    assert torch.equal(got.to_dense(), want), f"seed {seed}"
    assert_same_layout(got, expected, f"seed {seed}")
    assert torch.equal(psa_kernels.build_level_map(q, k, **kw), want)  # the dense form alone


def assert_same_layout(got, want, msg):
    for name in ("counts", "indices", "plan", "cost", "visible"):
        assert torch.equal(getattr(got, name), getattr(want, name)), f"{msg}: {name}"
    for name in ("block_q", "block_k", "q_len", "k_len", "causal"):
        assert getattr(got, name) == getattr(want, name), f"{msg}: {name}"


@pytest.mark.parametrize("case", range(4))
def test_layout_writers_agree_and_plan_what_the_geometry_allows(case):
    """The Triton layout writer and its tensor-op twin give the same LevelMap for random maps,
    lengths, causality and padding; each level list holds its whole blocks first, then the
    readable others, then the blocks past the causal diagonal; cost and visible give the
    reference's density."""
    from psa_kernels.blocks import block_flags
    from psa_kernels.level_map import _compact_torch

    seed = fresh_seed()
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    B, Hm, bq, bk = 2, rnd.choice([1, 3]), rnd.choice([32, 64]), rnd.choice([16, 32, 64])
    causal = rnd.random() < 0.6
    Lk = rnd.randrange(100, 600)
    Lq = rnd.randrange(20, Lk + 1) if causal else rnd.randrange(20, 400)
    nq, nk = -(-Lq // bq), -(-Lk // bk)
    lm = LEVELS[torch.randint(0, 5, (B, Hm, nq, nk), generator=g)].to(DEVICE)
    pad = None
    if rnd.random() < 0.5:
        pad = torch.ones(B, Lk, dtype=torch.bool)
        pad[0, : rnd.randrange(1, Lk // 2)] = False
        pad = pad.to(DEVICE)
    geometry = dict(block_q=bq, block_k=bk, q_len=Lq, k_len=Lk, causal=causal, key_padding_mask=pad)
    got = LevelMap.from_dense(lm, **geometry)
    twin = _compact_torch(lm, **geometry)
    assert_same_layout(got, twin, f"seed {seed}")
    assert torch.equal(got.to_dense(), lm) and torch.equal(dataclasses.replace(got, dense=None).to_dense(), lm)
    readable, visible, whole = (t.expand(B, nq, nk) for t in block_flags(Lq, Lk, bq, bk, causal, pad, lm.device))
    for b in range(B):
        for h in range(Hm):
            for i in range(nq):
                row = got.indices[b, h, i].long().tolist()
                start = 0
                for r, p in enumerate((1, 2, 4, 8)):
                    n, n_read, n_whole = (int(got.counts[b, h, i, r]), int(got.plan[b, h, i, r]),
                                          int(got.plan[b, h, i, 4 + r]))
                    listed = row[start : start + n]
                    assert sorted(listed) == [j for j in range(nk) if lm[b, h, i, j] == p], f"seed {seed}"
                    flags = [(bool(whole[b, i, j]), bool(readable[b, i, j])) for j in listed]
                    assert all(w for w, _ in flags[:n_whole]) and not any(w for w, _ in flags[n_whole:])
                    assert all(rd for _, rd in flags[:n_read]) and not any(rd for _, rd in flags[n_read:])
                    assert listed[:n_whole] == sorted(listed[:n_whole])
                    assert listed[n_whole:] == sorted(listed[n_whole:])
                    start += n
    density = blocks.density(lm, causal=causal, q_len=Lq, k_len=Lk, block_q=bq, block_k=bk, key_padding_mask=pad)
    assert torch.allclose(got.density(), density.float(), atol=1e-6), f"seed {seed}"


@pytest.mark.parametrize("case", range(4))
def test_similarity_cap_kernel_matches_the_reference(case):
    from psa_kernels.key_blocks import similarity_cap_triton

    seed = fresh_seed()
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    B, H, D = 2, rnd.choice([1, 3]), rnd.choice([64, 80])
    block_k = rnd.choice([16, 32, 64, 128])
    Lk = rnd.randrange(block_k + 1, 5 * block_k)
    # Smooth keys (neighbours similar) plus noise of a random strength: the mean similarities
    # spread over the thresholds' range, so every cap value occurs.
    t = torch.linspace(0, rnd.uniform(2, 40), Lk)
    smooth = torch.stack([torch.sin(t * (i + 1) / 3) for i in range(8)], -1) @ torch.randn(8, D, generator=g)
    k = (smooth + rnd.uniform(0.05, 1.5) * torch.randn(B, H, Lk, D, generator=g)).to(DEVICE)
    pad = None
    if rnd.random() < 0.5:
        pad = torch.ones(B, Lk, dtype=torch.bool)
        pad[1, : rnd.randrange(1, Lk // 2)] = False
        pad = pad.to(DEVICE)
    thresholds = {2: 0.75, 4: 0.70, 8: 0.70} if rnd.random() < 0.5 else {2: 0.3, 8: 0.1}
    got = similarity_cap_triton(k, block_k=block_k, thresholds=thresholds, key_padding_mask=pad)
    want = reference.similarity_cap(k.double(), block_k=block_k, thresholds=thresholds, key_padding_mask=pad)
    assert torch.equal(got, want), f"seed {seed}"
    assert torch.equal(psa_kernels.similarity_cap(k, block_k=block_k, thresholds=thresholds, key_padding_mask=pad),
                       got)


@pytest.mark.parametrize("case", range(3))
def test_block_flags_kernel_matches_the_reference(case):
    """kernels/key_blocks.py's flags against the reference's forced columns and rows and valid
    key blocks: text given or as a tail, padding, causal queries shorter than the keys."""
    from psa_kernels.key_blocks import key_blocks, padding_flags

    seed = fresh_seed()
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    B, bq, bk = 2, rnd.choice([32, 64]), rnd.choice([16, 24, 64])
    Lk = rnd.randrange(100, 500)
    Lq = rnd.randrange(10, Lk + 1)
    k = torch.randn(B, 2, Lk, 64, generator=g).to(DEVICE)
    pad = None
    if case > 0:
        pad = torch.ones(B, Lk, dtype=torch.bool)
        pad[1, : rnd.randrange(1, Lk // 2)] = False
        pad = pad.to(DEVICE)
    text = (torch.rand(B, Lk, generator=g) < 0.05).to(DEVICE) if case != 1 else None
    tail = rnd.choice([0, 40])
    got = key_blocks(k, q_len=Lq, block_q=bq, block_k=bk, thresholds=None, text_mask=text, dense_tail_tokens=tail,
                     key_padding_mask=pad)
    cols, rows = blocks.forced_columns_and_rows(batch=B, q_len=Lq, k_len=Lk, block_q=bq, block_k=bk,
                                                   text_mask=text, dense_tail_tokens=tail, key_padding_mask=pad,
                                                   device=DEVICE)
    # The assignment adds the sink and the first real token's block to the text columns.
    j = torch.arange(cols.shape[1], device=DEVICE)
    first_real = torch.argmax(pad.int(), -1) // bk if pad is not None else torch.zeros(B, dtype=torch.long,
                                                                                        device=DEVICE)
    assert torch.equal(got["text_cols"].bool() | (j == 0) | (j[None, :] == first_real[:, None]), cols), f"seed {seed}"
    assert torch.equal(got["text_rows"].bool(), rows), f"seed {seed}"
    if pad is not None:
        assert torch.equal(got["any_valid"].bool(), blocks.valid_key_blocks(pad, Lk, bk)), f"seed {seed}"
        any_valid, all_valid = padding_flags(pad, Lk, bk)
        assert torch.equal(got["any_valid"], any_valid) and torch.equal(got["all_valid"], all_valid), f"seed {seed}"


def _kernel_map_equals_reference(q, k, kw, seed, Lq, Lk):
    """The fused kernels' compact map against the reference's dense one: the same levels, and the
    same layout as the reference map compacted; returns (kernel map, reference map)."""
    got = psa_kernels.build_level_map(q, k, compact=True, **kw)
    want = reference.build_level_map(q, k, **kw)
    assert torch.equal(got.to_dense(), want), f"seed {seed}"
    expected = LevelMap.from_dense(want, block_q=kw["block_q"], block_k=kw["block_k"], q_len=Lq, k_len=Lk,
                                   causal=kw["causal"], key_padding_mask=kw["key_padding_mask"])
    assert_same_layout(got, expected, f"seed {seed}")
    return got, want


@pytest.mark.parametrize("case", range(6))
def test_budget_assignment_matches_the_reference_exactly(case):
    """The budget policy in kernels/assign.py against reference.build_level_map on the same
    scores and block similarities: dyadic values and budgets (every product and sum exact in
    fp32), every option (levels, shared GQA map, similarity cap, padding, causal Lq < Lk, text)."""
    seed, rnd, g, (B, Hkv, G, Hq, bq, bk, Lq, Lk, causal), (q, k), (nq, nk) = _random_assign_case()
    scores = torch.randint(0, 64, (B, Hq, nq, nk), generator=g).float() ** 2 / 4096
    scores[0, 0, 0] = 0.0  # a row with no mass: uniform over its visible blocks
    scores[1, 0, nq - 1] = 0.25  # a row of ties (the last row: a short query may have only one)
    sims = torch.randint(-4, 17, (B, Hkv, nk, 3), generator=g).float() / 16
    sims[0, 0, :3, 2] = float("-inf")  # blocks without a pair at level 8
    least = sims - torch.randint(0, 8, (B, Hkv, nk, 3), generator=g).float() / 16  # the least similar pairs
    pad = None
    if rnd.random() < 0.5:
        pad = torch.ones(B, Lk, dtype=torch.bool)
        pad[1, : rnd.randrange(1, Lk // 2)] = False
        pad = pad.to(DEVICE)
    kw = dict(causal=causal, block_q=bq, block_k=bk, scores=scores.to(DEVICE), block_sims=sims.to(DEVICE),
              block_min_sims=least.to(DEVICE),
              key_padding_mask=pad, mode="budget", target_sparsity=rnd.choice([0.5, 0.75, 0.875, 0.9375]),
              share_kv_group=rnd.random() < 0.5, similarity=rnd.choice([None, (0.1, 0.0, -0.1)]),
              dense_tail_tokens=rnd.choice([0, 40]), min_full_fraction=rnd.choice([0.0, 0.06]),
              levels=rnd.choice([(1, 2, 4, 8), (1,), (1, 4), (1, 2, 8)]))
    got, want = _kernel_map_equals_reference(q, k, kw, seed, Lq, Lk)
    assert set(want.unique().tolist()) - {0} <= set(kw["levels"]) | {1}, f"seed {seed}"


@pytest.mark.parametrize("case", range(3))
def test_budget_full_share_matches_the_reference_exactly(case):
    """The budget policy's first step (level 1 for the top-ranked free blocks above the free
    mean, within ``budget_full_share`` of the budget) in kernels/assign.py against the reference:
    shares from 0 (the optimiser alone) to 1, scores in eighths (many ties: the first step cuts
    through tied ranks, where index order decides, and blocks sit exactly at the mean, which
    must not count as above it), dyadic budgets (the share boundary ``t < share * b`` falls on
    exact values). The maps agree bit for bit, and no row spends more than its budget beyond
    its forced blocks."""
    seed, rnd, g, (B, Hkv, G, Hq, bq, bk, Lq, Lk, causal), (q, k), (nq, nk) = _random_assign_case()
    scores = torch.randint(0, 8, (B, Hq, nq, nk), generator=g).float() / 8
    scores[0, 0, 0] = 0.0  # no mass: uniform, nothing above the mean
    scores[1, 0, nq - 1] = 0.25  # the last row: three tied blocks above an otherwise flat row
    scores[1, 0, nq - 1, -3:] = 0.5
    sims = torch.randint(-4, 17, (B, Hkv, nk, 3), generator=g).float() / 16
    least = sims - torch.randint(0, 8, (B, Hkv, nk, 3), generator=g).float() / 16
    pad = None
    if rnd.random() < 0.5:
        pad = torch.ones(B, Lk, dtype=torch.bool)
        pad[1, : rnd.randrange(1, Lk // 2)] = False
        pad = pad.to(DEVICE)
    sparsity = rnd.choice([0.5, 0.75, 0.875, 0.9375])
    tail = rnd.choice([0, 40])
    kw = dict(causal=causal, block_q=bq, block_k=bk, scores=scores.to(DEVICE), block_sims=sims.to(DEVICE),
              block_min_sims=least.to(DEVICE), key_padding_mask=pad, mode="budget", target_sparsity=sparsity,
              budget_full_share=rnd.choice([0.0, 0.25, 0.375, 0.5, 0.75, 1.0]),
              share_kv_group=rnd.random() < 0.5, similarity=rnd.choice([None, (0.1, 0.0, -0.1)]),
              dense_tail_tokens=tail, min_full_fraction=0.0, levels=rnd.choice([(1, 2, 4, 8), (1, 2, 8)]))
    got, want = _kernel_map_equals_reference(q, k, kw, seed, Lq, Lk)
    geometry = dict(batch=B, q_len=Lq, k_len=Lk, block_q=bq, block_k=bk, causal=causal, key_padding_mask=pad,
                    device=DEVICE)
    visible = blocks.block_visibility(**geometry)
    forced = blocks.forced_full_blocks(dense_tail_tokens=tail, **geometry) & visible
    budget = torch.maximum((1 - sparsity) * visible.sum(-1).float(), forced.sum(-1).float())  # [B, nq]
    assert torch.all(got.cost <= budget[:, None] + 1e-6), f"seed {seed}"


def test_block_similarities_kernel_matches_the_reference():
    from psa_kernels.key_blocks import key_blocks

    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    Lk, block_k = 300, 32
    t = torch.linspace(0, 9, Lk)
    k = (torch.stack([torch.sin(t * (i + 1) / 3) for i in range(8)], -1) @ torch.randn(8, 64, generator=g)
         + 0.4 * torch.randn(2, 3, Lk, 64, generator=g)).to(DEVICE)
    pad = torch.ones(2, Lk, dtype=torch.bool, device=DEVICE)
    pad[1, :70] = False  # whole blocks without a valid pair: -inf
    out = key_blocks(k, q_len=Lk, block_q=64, block_k=block_k, thresholds=None, key_padding_mask=pad, flags=False,
                     sims=True, min_sims=True)
    for name, reduce in (("sims", "mean"), ("min_sims", "min")):  # the mean and the least similar pair
        got = out[name]
        want = reference.block_similarity(k.double(), block_k=block_k, key_padding_mask=pad, reduce=reduce)
        assert torch.equal(torch.isinf(got), torch.isinf(want)), f"seed {seed}"
        finite = torch.isfinite(want)
        assert torch.allclose(got[finite].double(), want[finite], atol=1e-5), f"seed {seed}"
    assert torch.all(out["min_sims"] <= out["sims"] + 1e-6)


def test_sparsity_of_a_layout_needs_no_geometry():
    g = torch.Generator().manual_seed(fresh_seed())
    lm = LEVELS[torch.randint(0, 5, (2, 3, 4, 7), generator=g)].to(DEVICE)
    geometry = dict(causal=True, q_len=200, k_len=220, block_q=64, block_k=32)
    layout = LevelMap.from_dense(lm, **geometry)
    assert torch.allclose(psa_kernels.sparsity(layout), psa_kernels.sparsity(lm, **geometry).float(), atol=1e-6)
    with pytest.raises(ValueError, match="carries its geometry"):
        psa_kernels.sparsity(layout, causal=True)
    with pytest.raises(ValueError, match="needs"):
        psa_kernels.sparsity(lm, causal=True)


def _random_assign_case():
    """A fresh random geometry for the assignment-kernel tests: (seed, its Random and torch
    Generator, (B, Hkv, G, Hq, block_q, block_k, Lq, Lk, causal), (q, k), (nq, nk))."""
    seed = fresh_seed()
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    B, Hkv, G = 2, 2, rnd.choice([1, 3])
    Hq = Hkv * G
    bq, bk = rnd.choice([32, 64]), rnd.choice([16, 32, 64])
    Lk = rnd.randrange(100, 700)  # up to 44 key blocks: the 64-lane sorts too
    causal = rnd.random() < 0.6
    # Queries up to 320: the interpreter's time grows with the rows (one program each; up to 54
    # s for one case with 700 queries), while every row shape (Lq < Lk, Lq == Lk when Lk is
    # short, partial blocks) still comes up.
    Lq = rnd.randrange(50, min(Lk, 320) + 1) if causal else rnd.randrange(50, 320)
    q = torch.randn(B, Hq, Lq, 64, generator=g).to(DEVICE)
    k = torch.randn(B, Hkv, Lk, 64, generator=g).to(DEVICE)
    return seed, rnd, g, (B, Hkv, G, Hq, bq, bk, Lq, Lk, causal), (q, k), (-(-Lq // bq), -(-Lk // bk))
