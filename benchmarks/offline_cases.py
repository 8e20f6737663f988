"""The launches :mod:`benchmarks.offline_compile` compiles: the real wrappers on CPU tensors."""

from __future__ import annotations

import torch


def cases(L: int = 4096):
    from psa_kernels.level_map import _compact_torch as compact_triton
    from psa_kernels.attention import psa_attention_triton
    from psa_kernels.importance import antidiagonal_importance_triton

    bf = torch.bfloat16
    q = torch.randn(1, 28, L, 128, dtype=bf)
    k = torch.randn(1, 4, L, 128, dtype=bf)
    v = torch.randn(1, 4, L, 128, dtype=bf)
    nq = L // 128
    dense = torch.tensor([0, 1, 2, 4, 8], dtype=torch.int8)[torch.randint(0, 5, (1, 28, nq, nq))]
    layout = compact_triton(dense, block_q=128, block_k=128, q_len=L, k_len=L, causal=True, key_padding_mask=None)
    for bn in (64, 128):
        for warps in (4, 8):
            yield f"attn_n{bn}_w{warps}", (lambda bn=bn, warps=warps: psa_attention_triton(
                q, k, v, layout, causal=True, block_n=bn, num_warps=warps))
    yield "importance_s8", lambda: antidiagonal_importance_triton(q, k, causal=True, stride=8)
    yield "importance_s8_fp8", lambda: antidiagonal_importance_triton(q, k, causal=True, stride=8, precision="fp8")
    yield "importance_s16_fp8", lambda: antidiagonal_importance_triton(q, k, causal=True, stride=16, precision="fp8")
