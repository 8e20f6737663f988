"""The block-by-block SDPA path of PSA attention (``psa_kernels.blockwise``, what serves where the
Triton kernels do not) against the dense reference, on fresh random inputs and maps: GQA ratio
7, head_dim 80, lengths that are not block multiples, left padding, causal queries shorter than
the keys, maps per query or per kv head, rows with no visible key."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import psa_kernels
from psa_kernels import reference
from psa_kernels.blockwise import psa_attention_blockwise

LEVELS = torch.tensor([0, 1, 2, 4, 8], dtype=torch.int8)
TOL = 1e-5  # ||out - ref|| / ||ref||, fp32 against fp64


def case(seed, *, B, Hq, Hkv, Lq, Lk, D, block_q, block_k, padded, per_kv=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g).to(dtype) for h, n in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk)))
    pad = None
    if padded:  # left padding; the last sequence keeps every token
        starts = torch.randint(0, Lk // 2 + 1, (B,), generator=g)
        starts[-1] = 0
        pad = torch.arange(Lk)[None, :] >= starts[:, None]
    lm = LEVELS[torch.randint(0, 5, (B, Hkv if per_kv else Hq, math.ceil(Lq / block_q), math.ceil(Lk / block_k)),
                              generator=g)]
    lm[:, 0, 0] = 0  # one empty row and one full row per map
    lm[:, -1, -1] = 1
    return q, k, v, lm, pad


def compare(seed, causal, block_q, block_k, **shape):
    q, k, v, lm, pad = case(seed, block_q=block_q, block_k=block_k, **shape)
    kw = dict(causal=causal, block_q=block_q, block_k=block_k, key_padding_mask=pad)
    out = psa_attention_blockwise(q, k, v, lm, **kw)
    ref = reference.psa_attention(q.double(), k.double(), v.double(), lm, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape and torch.isfinite(out).all(), f"seed {seed}"
    if ref.norm() == 0:
        assert torch.all(out == 0), f"seed {seed}"
    else:
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < (TOL if q.dtype == torch.float32 else 1e-2), f"seed {seed}: relative error {err:.2e}"
    # Rows the reference leaves at exactly 0 (no visible key) are exactly 0 here too.
    assert torch.all(out[ref == 0] == 0), f"seed {seed}"
    return out


@pytest.mark.parametrize("ratio,D", [(1, 64), (2, 80), (7, 80), (7, 128)])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_awkward_shapes_against_reference(causal, ratio, D):
    seed = random.SystemRandom().randrange(2**31)
    rnd = random.Random(seed)
    block_q, block_k = rnd.choice([(64, 32), (128, 64), (32, 128)])
    Lk = rnd.randrange(2 * block_k + 1, 5 * block_k) | 1  # odd: never a block multiple
    Lq = rnd.randrange(block_q // 2, Lk) if causal else rnd.randrange(block_q + 1, 3 * block_q) | 1
    compare(seed, causal, block_q, block_k, B=2, Hq=ratio, Hkv=1, Lq=Lq, Lk=Lk, D=D, padded=True,
            per_kv=rnd.random() < 0.5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(causal=st.booleans(), hkv=st.integers(1, 2), ratio=st.sampled_from([1, 2, 7]), D=st.sampled_from([16, 80]),
       block_q=st.sampled_from([16, 64]), block_k=st.sampled_from([8, 32, 128]), Lk=st.integers(1, 300),
       frac=st.floats(0.05, 1.0), padded=st.booleans(), per_kv=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_property_random_shapes_and_maps(causal, hkv, ratio, D, block_q, block_k, Lk, frac, padded, per_kv, seed):
    Lq = max(1, int(Lk * frac)) if causal else max(1, int(300 * frac))
    compare(seed, causal, block_q, block_k, B=2, Hq=hkv * ratio, Hkv=hkv, Lq=Lq, Lk=Lk, D=D, padded=padded,
            per_kv=per_kv)


def test_rows_with_no_visible_key_are_zero_not_nan():
    seed = random.SystemRandom().randrange(2**31)
    q, k, v, _, _ = case(seed, B=2, Hq=2, Hkv=1, Lq=64, Lk=64, D=32, block_q=64, block_k=32, padded=False)
    pad = torch.ones(2, 64, dtype=torch.bool)
    pad[0, :40] = False  # causal rows 0..39 of sequence 0 see only padding
    lm = torch.ones(2, 2, 1, 2, dtype=torch.int8)
    out = psa_attention_blockwise(q, k, v, lm, causal=True, block_q=64, block_k=32, key_padding_mask=pad)
    assert torch.isfinite(out).all() and torch.all(out[0, :, :40] == 0) and out[0, :, 40:].abs().sum() > 0
    empty = psa_attention_blockwise(q, k, v, torch.zeros_like(lm), block_q=64, block_k=32)
    assert torch.all(empty == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp32(dtype):
    seed = random.SystemRandom().randrange(2**31)
    compare(seed, True, 64, 32, B=2, Hq=7, Hkv=1, Lq=90, Lk=150, D=80, padded=True, dtype=dtype)


def test_public_entry_point_uses_it_off_the_kernels_and_keeps_the_reference_for_fp64(monkeypatch):
    import psa_kernels.blockwise as blockwise
    import psa_kernels.ops as ops

    monkeypatch.setattr(ops, "kernels_available", lambda device: False)
    calls = []
    real = blockwise.psa_attention_blockwise
    monkeypatch.setattr(blockwise, "psa_attention_blockwise", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    seed = random.SystemRandom().randrange(2**31)
    q, k, v, lm, pad = case(seed, B=2, Hq=4, Hkv=2, Lq=70, Lk=70, D=32, block_q=32, block_k=32, padded=True)
    out = psa_kernels.psa_attention(q, k, v, lm, causal=True, block_q=32, block_k=32, key_padding_mask=pad)
    assert calls == [1]
    ref = psa_kernels.psa_attention(q.double(), k.double(), v.double(), lm, causal=True, block_q=32, block_k=32,
                                    key_padding_mask=pad)
    assert calls == [1], "fp64 is the reference's"
    assert ((out.double() - ref).norm() / ref.norm()).item() < TOL, f"seed {seed}"
