"""The Hopper attention kernel's choice and build (its numbers are checked on the GPU by
tests/gpu/check_kernels.py against the reference, beside the Triton kernel)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import psa_kernels
from psa_kernels.utils import gluon_importable

REPO = Path(__file__).resolve().parent.parent
needs_gluon = pytest.mark.skipif(not gluon_importable(), reason="this Triton has no Gluon")


def test_cpu_tensors_and_the_environment_pick_the_triton_kernel(monkeypatch):
    q = torch.randn(1, 2, 8, 128, dtype=torch.bfloat16)
    monkeypatch.delenv(psa_kernels.ops.KERNEL_ENV, raising=False)
    assert psa_kernels.attention_kernel(q) == "triton"
    monkeypatch.setenv(psa_kernels.ops.KERNEL_ENV, "triton")
    assert psa_kernels.attention_kernel(q) == "triton"
    monkeypatch.setenv(psa_kernels.ops.KERNEL_ENV, "gluon")
    with pytest.raises(ValueError, match="PSA_ATTENTION_KERNEL='gluon'.*'auto' or 'triton'"):
        psa_kernels.attention_kernel(q)


@needs_gluon
@pytest.mark.parametrize("capability, dtype, D, blocks, reason", [
    ((9, 0), torch.bfloat16, 128, (128, 128), None),
    ((9, 0), torch.bfloat16, 80, (128, 128), None),
    ((9, 0), torch.float16, 128, (128, 128), None),
    ((8, 0), torch.bfloat16, 128, (128, 128), "not a Hopper GPU"),
    ((10, 0), torch.bfloat16, 128, (128, 128), "not a Hopper GPU"),
    ((9, 0), torch.float32, 128, (128, 128), "dtype torch.float32"),
    ((9, 0), torch.bfloat16, 256, (128, 128), "head dim 256"),
    ((9, 0), torch.bfloat16, 100, (128, 128), "head dim 100"),
    ((9, 0), torch.bfloat16, 128, (64, 128), "blocks 64x128"),
    ((9, 0), torch.bfloat16, 128, (128, 32), "blocks 128x32"),
])
def test_hopper_kernel_says_which_limit_a_call_misses(monkeypatch, capability, dtype, D, blocks, reason):
    from psa_kernels import attention_hopper

    monkeypatch.setattr(attention_hopper, "_capability", lambda index: capability)
    q = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=dtype, shape=(1, 4, 300, D))
    got = attention_hopper.hopper_reason(q, *blocks)
    assert got == reason if reason is None else reason in got
    assert attention_hopper.hopper_reason(torch.empty(1, 4, 300, D, dtype=dtype), *blocks) == "not a CUDA tensor"


@needs_gluon
def test_token_major_inputs_are_read_in_place_whatever_a_batch_of_one_strides():
    """q, k, v in [B, L, H, 128] memory are read through a [B * L, H * 128] descriptor, not copied:
    also with B = 1 and a batch stride no copy would give (a permuted [L, H, D] tensor), which the
    memory check's inputs have and which cost three copies (q + k + v, 576 MiB at 64k) before."""
    from psa_kernels.attention_hopper import _descriptor, _token_major

    H, L, D = 4, 40, 128
    projected = torch.randn(2, L, H, D, dtype=torch.bfloat16).transpose(1, 2)
    permuted = torch.randn(L, H, D, dtype=torch.bfloat16).transpose(0, 1).unsqueeze(0)
    assert permuted.stride(0) != L * H * D
    for t in (projected, permuted, projected[:1]):
        assert _token_major(t)
        desc = _descriptor(t, 64, token_major=True)
        assert desc.base.data_ptr() == t.data_ptr() and desc.shape == [t.shape[0] * L, H * D]
        assert torch.equal(desc.base.view(t.shape[0], L, H, D).transpose(1, 2), t)
    strided_batch = torch.randn(3, L, H, D, dtype=torch.bfloat16).transpose(1, 2)[::2]  # batch stride 2 L H D
    assert not _token_major(strided_batch)
    assert not _token_major(torch.randn(1, H, L, D, dtype=torch.bfloat16))  # rows of D: the other descriptor
    assert not _token_major(torch.randn(1, L, H, 64, dtype=torch.bfloat16).transpose(1, 2))  # D < 128


@needs_gluon
def test_descriptors_copied_from_a_checked_one_equal_the_constructors():
    """After a call's first descriptor, the others copy its fields (the constructor's checks cost
    microseconds each): every field equals what the constructor builds, on this Triton's fields."""
    import dataclasses

    from psa_kernels.attention_hopper import _descriptor

    q = torch.randn(1, 4, 300, 128, dtype=torch.bfloat16)
    k = torch.randn(1, 300, 2, 128, dtype=torch.bfloat16).transpose(1, 2)
    pooled = torch.randn(1, 2, 170, 80, dtype=torch.bfloat16)
    first = _descriptor(q, 64)
    for t, rows, token_major in ((k, 128, True), (pooled, 32, False), (q, 16, False)):
        built, copied = _descriptor(t, rows, token_major), _descriptor(t, rows, token_major, like=first)
        for field in dataclasses.fields(built):
            a, b = getattr(built, field.name), getattr(copied, field.name)
            if isinstance(a, torch.Tensor):
                assert a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride(), field.name
            else:
                assert a == b, (field.name, a, b)


_COMPILE = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from offline_compile import sm90_compiler
from psa_kernels import LevelMap
from psa_kernels.attention_hopper import psa_attention_hopper

shared = {}
for causal, padded, D, nstage, tm in [(True, False, 128, 2, False), (True, False, 128, 3, False),
                                      (False, True, 80, 2, False), (True, True, 128, 2, True)]:
    B, Hq, Hkv, L = 2, 28, 4, 1000
    def make(H):
        if tm:  # token-major memory, as a model's projections leave q, k, v
            return torch.randn(B, L, H, D, dtype=torch.bfloat16).transpose(1, 2)
        return torch.randn(B, H, L, D, dtype=torch.bfloat16)
    q, k, v = make(Hq), make(Hkv), make(Hkv)
    mask = torch.ones(B, L, dtype=torch.bool) if padded else None
    levels = torch.tensor([0, 1, 2, 4, 8], dtype=torch.int8)[torch.randint(0, 5, (B, Hkv, 8, 8))]
    layout = LevelMap.from_dense(levels, block_q=128, block_k=128, q_len=L, k_len=L, causal=causal,
                                 key_padding_mask=mask)
    with sm90_compiler() as compiled:
        psa_attention_hopper(q, k, v, layout, causal=causal, key_padding_mask=mask, nstage=nstage)
    kernels = {name: kernel for name, kernel in compiled if kernel is not None}
    shared[f"causal={causal} padded={padded} D={D} nstage={nstage} token-major={tm}"] = \
        kernels["_psa_kernel"].metadata.shared
print(json.dumps(shared))
"""


@needs_gluon
def test_hopper_kernel_compiles_for_sm90_within_shared_memory():
    """Compiled for sm_90 without a GPU (Triton's compiler with a fake driver, in a process without
    the interpreter, whose setting changes how kernels are built at import): the kernel builds for
    causal and bidirectional calls, padding, head dims 128 and 80, two or three ring stages and
    token-major inputs,
    and its K/V ring, query tiles and barriers fit Hopper's 227 KB a block (a launch past it fails
    on the GPU only)."""
    import json
    import os
    import subprocess

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE, str(REPO / "benchmarks")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    shared = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(shared) == 4, shared
    for label, size in shared.items():
        assert 128 * 1024 < size <= 227 * 1024, (label, size)


def _packed_rows(layout, b, hm, qb):
    """The Hopper kernel's stage plan for one query block, written plainly: per level (1, 2, 4, 8)
    the whole blocks packed one after another, then from a fresh 128-row stage the partial ones;
    each block is ``128 / p`` rows of its level. Returns the two sections as lists of
    ``(level index, block)`` per row of a block, and the per-level counts the kernel reads."""
    idx = layout.indices[b, hm, qb].long().tolist()
    counts = layout.counts[b, hm, qb].tolist()
    plan = layout.plan[b, hm, qb].tolist()
    read, whole = plan[:4], plan[4:]
    starts = [0, counts[0], counts[0] + counts[1], counts[0] + counts[1] + counts[2]]
    sections = []
    for first, number in (([0] * 4, whole), (whole, [r - w for r, w in zip(read, whole)])):
        rows = []
        for lv in range(4):
            for j in range(number[lv]):
                block = idx[starts[lv] + first[lv] + j]
                rows += [(lv, block * (128 >> lv) + r) for r in range(128 >> lv)]
        sections.append(rows)
    return sections


def _column_decode(x, ends, first, idx):
    """The kernel's decode of packed row ``x`` of a section from the counts alone (``ends``: where
    levels 1, 2, 4 end; ``first``: each level's first list entry): level and key of that level."""
    lv = sum(x >= e for e in ends)
    start = ([0] + list(ends))[lv]
    shift = 7 - lv
    block = idx[first[lv] + ((x - start) >> shift)]
    return lv, (block << shift) + ((x - start) & ((1 << shift) - 1))


@pytest.mark.parametrize("causal, padded, Lq, Lk", [(True, False, 700, 700), (True, True, 600, 600),
                                                    (True, False, 200, 900), (False, True, 500, 500)])
def test_packed_stages_decode_back_to_the_level_lists_and_reproduce_the_reference(causal, padded, Lq, Lk):
    """The Hopper kernel packs blocks of several levels into one 128-row stage and recovers each
    row's level and key from the per-level counts alone (it has no per-row table). Here that plan
    and decode, in plain Python on random maps, must (1) give back exactly the level lists, with
    no block straddling two stages, and (2) attend over the packed rows to the reference's
    output. A mismatch on the GPU with this passing points at the kernel's data movement."""
    from psa_kernels import LevelMap, reference

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    B, Hq, Hkv, D = 2, 4, 2, 16
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64) for _ in range(2))
    mask = None
    if padded:
        mask = torch.ones(B, Lk, dtype=torch.bool)
        mask[1, : Lk // 3] = False
    nq, nk = -(-Lq // 128), -(-Lk // 128)
    dense = torch.tensor([0, 1, 2, 4, 8], dtype=torch.int8)[torch.randint(0, 5, (B, Hq, nq, nk), generator=g)]
    dense[..., 0] = 1
    layout = LevelMap.from_dense(dense, block_q=128, block_k=128, q_len=Lq, k_len=Lk, causal=causal,
                                 key_padding_mask=mask)
    pyramid = reference.build_pyramid(k, v, mask)
    levels = [pyramid[p] for p in (1, 2, 4, 8)]
    want = reference.psa_attention(q, k, v, dense, causal=causal, key_padding_mask=mask)
    got = torch.zeros_like(want)
    for b in range(B):
        for h in range(Hq):
            for qb in range(nq):
                sections = _packed_rows(layout, b, h, qb)
                idx = layout.indices[b, h, qb].long().tolist()
                counts, plan = layout.counts[b, h, qb].tolist(), layout.plan[b, h, qb].tolist()
                starts = [0, counts[0], counts[0] + counts[1], counts[0] + counts[1] + counts[2]]
                keys, vals, bias, last = [], [], [], []
                for part, rows in enumerate(sections):
                    number = plan[4:] if part == 0 else [plan[i] - plan[4 + i] for i in range(4)]
                    ends, total = [], 0
                    for lv in range(4):
                        total += number[lv] * (128 >> lv)
                        ends.append(total)
                    first = [starts[lv] + (0 if part == 0 else plan[4 + lv]) for lv in range(4)]
                    for x, (lv, key) in enumerate(rows):
                        # Runs of coarser levels start at multiples of their block size: no block
                        # straddles two 128-row stages.
                        assert ([0] + ends)[lv] % (128 >> lv) == 0
                        assert _column_decode(x, ends[:3], first, idx) == (lv, key)
                        level = levels[lv]
                        cnt = int(level.counts[b, key]) if key < level.counts.shape[1] else 0
                        if cnt == 0:  # past the end, padding: the kernel masks the column out
                            continue
                        keys.append(level.keys[b, h // (Hq // Hkv), key])
                        vals.append(level.values[b, h // (Hq // Hkv), key])
                        bias.append(torch.log(torch.tensor(float(cnt), dtype=torch.float64)))
                        last.append(int(level.last[b, key]))
                r = torch.arange(qb * 128, min(qb * 128 + 128, Lq))
                if not keys:
                    continue
                logits = q[b, h, r] @ torch.stack(keys).T * D**-0.5 + torch.stack(bias)[None]
                if causal:
                    logits = logits.masked_fill(torch.tensor(last)[None] > (r + Lk - Lq)[:, None], float("-inf"))
                weights = torch.softmax(logits, -1).nan_to_num(0.0)
                got[b, h, r] = weights @ torch.stack(vals)
    assert torch.allclose(got, want, atol=1e-10), (got - want).abs().max()


def test_a_hopper_kernel_that_fails_to_build_hands_over_to_the_triton_kernel(monkeypatch, caplog):
    """Gluon is experimental: where a Triton cannot build the Hopper kernel (or a GPU lacks its
    shared memory), the call is served by the Triton kernel with a warning, and so is every later
    call (no second attempt per layer)."""
    import logging

    from triton.runtime.errors import OutOfResources

    from psa_kernels import LevelMap, attention_hopper, ops, reference

    monkeypatch.setattr(ops, "_hopper_failed", [])
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(attention_hopper, "psa_attention_hopper", broken)
    monkeypatch.setattr(ops, "attention_kernel", lambda q, *a: "triton" if ops._hopper_failed else "hopper")
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    q = torch.randn(1, 4, 200, 32, generator=g)
    k, v = (torch.randn(1, 2, 200, 32, generator=g) for _ in range(2))
    if not psa_kernels.kernels_available(q.device):
        pytest.skip("the Triton kernels do not serve CPU tensors here (no interpreter)")
    dense = torch.tensor([0, 1, 2, 4, 8], dtype=torch.int8)[torch.randint(0, 5, (1, 4, 2, 2), generator=g)]
    dense[..., 0] = 1
    layout = LevelMap.from_dense(dense, block_q=128, block_k=128, q_len=200, k_len=200, causal=True)
    with caplog.at_level(logging.WARNING, logger="psa_kernels"):
        first = psa_kernels.psa_attention(q, k, v, layout, causal=True)
        second = psa_kernels.psa_attention(q, k, v, layout, causal=True)
    want = reference.psa_attention(q.double(), k.double(), v.double(), dense, causal=True)
    assert torch.allclose(first.double(), want, atol=1e-4) and torch.equal(first, second)
    assert len(calls) == 1, "the Hopper kernel is not tried again after it failed"
    assert "Hopper kernel failed" in caplog.text and "OutOfResources" in caplog.text
