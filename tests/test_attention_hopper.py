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
    ((9, 0), torch.float16, 80, (128, 128), None),
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
