"""Sweep the PSA attention kernel's launch parameters on a GPU (prints a table, writes JSON).

    python benchmarks/tune_attention.py [--L 32768] [--out DIR]

Times ``psa_attention_triton`` for every (block_n, num_warps, num_stages) on three level maps
(all level 1, a pyramid mix, binary 20%) against dense SDPA, with CUDA events (median of repeats,
warm-up excluded). Use it to choose the defaults in kernels/attention.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from psa_kernels.attention import psa_attention_triton
from psa_kernels.level_map import LevelMap


@triton.jit
def _plain_flash(Q, K_DESC, V_DESC, OUT, qk_scale, Hq, GROUP, L,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """A minimal causal flash-attention forward (no PSA): the ceiling this Triton reaches here."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    hk = (bh % Hq) // GROUP
    b = bh // Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + bh * L * D + offs_m[:, None] * D + offs_d[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start in range(0, pid_m * BLOCK_M, BLOCK_N):  # off-diagonal tiles: no mask
        acc, m_i, l_i = _plain_step(q, K_DESC, V_DESC, b, hk, start, offs_m, acc, m_i, l_i, qk_scale,
                                    False, BLOCK_N, D)
    for start in range(pid_m * BLOCK_M, (pid_m + 1) * BLOCK_M, BLOCK_N):  # diagonal tiles
        acc, m_i, l_i = _plain_step(q, K_DESC, V_DESC, b, hk, start, offs_m, acc, m_i, l_i, qk_scale,
                                    True, BLOCK_N, D)
    tl.store(OUT + bh * L * D + offs_m[:, None] * D + offs_d[None, :], (acc / l_i[:, None]).to(tl.bfloat16))


@triton.jit
def _plain_step(q, K_DESC, V_DESC, b, hk, start, offs_m, acc, m_i, l_i, qk_scale,
                CAUSAL_MASK: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    k = K_DESC.load([b, hk, start, 0]).reshape(BLOCK_N, D)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if CAUSAL_MASK:
        s = tl.where(offs_m[:, None] >= (start + tl.arange(0, BLOCK_N))[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = V_DESC.load([b, hk, start, 0]).reshape(BLOCK_N, D)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


def plain_flash(q, k, v, block_n=64, num_warps=8, num_stages=3):
    B, Hq, L, D = q.shape
    out = torch.empty_like(q)
    desc = [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, D]) for t in (k, v)]
    _plain_flash[(L // 128, B * Hq)](q, *desc, out, D**-0.5 * 1.4426950408889634, Hq, Hq // k.shape[1], L,
                                     BLOCK_M=128, BLOCK_N=block_n, D=D, num_warps=num_warps, num_stages=num_stages)
    return out


def level_maps(nq, nk, heads, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(nq)
    u = torch.rand(1, heads, nq, nk, generator=g)
    yield "all level 1", torch.ones(1, heads, nq, nk, dtype=torch.int8)
    mix = torch.where(u < 0.1, 1, torch.where(u < 0.2, 2, torch.where(u < 0.3, 4, torch.where(u < 0.5, 8, 0))))
    mix = mix.to(torch.int8)
    mix[..., 0] = 1
    mix[..., idx, idx] = 1
    yield "pyramid mix", mix
    binary = (u < 0.2).to(torch.int8)
    binary[..., 0] = 1
    binary[..., idx, idx] = 1
    yield "binary 20%", binary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--L", type=int, default=32768)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    L, Hq, Hkv, D = args.L, 28, 4, 128
    q = torch.randn(1, Hq, L, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
    dense = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                     warmup=50, rep=200, return_mode="median")
    rows = []
    print(f"L={L} dense SDPA {dense:.2f} ms")
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for bn, warps, stages in itertools.product((64, 128), (4, 8), (2, 3)):
        try:
            err = ((plain_flash(q, k, v, bn, warps, stages).float() - ref.float()).norm() / ref.float().norm()).item()
            ms = do_bench(lambda: plain_flash(q, k, v, bn, warps, stages), warmup=25, rep=100, return_mode="median")
        except Exception as exc:  # noqa: BLE001
            print(f"plain flash bn={bn} warps={warps} stages={stages} failed: {type(exc).__name__}")
            continue
        rows.append(dict(map="plain flash (no PSA)", block_n=bn, num_warps=warps, num_stages=stages, ms=ms,
                         dense_ms=dense, rel_err=err))
        print(f"plain flash  {bn:4d} {warps:5d} {stages:6d} {ms:8.2f} {ms / dense:8.2f}  err {err:.1e}", flush=True)
    print(f"{'map':12s} {'bn':>4s} {'warps':>5s} {'stages':>6s} {'ms':>8s} {'x dense':>8s}")
    for name, lm in level_maps(L // 128, L // 128, Hq):
        layout = LevelMap.from_dense(lm.cuda(), block_q=128, block_k=128)
        for bn, warps, stages in itertools.product((64, 128), (4, 8), (2, 3)):
            try:
                ms = do_bench(lambda: psa_attention_triton(q, k, v, layout, causal=True, block_n=bn, num_warps=warps,
                                                           num_stages=stages), warmup=25, rep=100,
                              return_mode="median")
            except Exception as err:  # noqa: BLE001 - a config that does not fit (shared memory) is skipped
                print(f"{name:12s} {bn:4d} {warps:5d} {stages:6d}  failed: {type(err).__name__}")
                continue
            rows.append(dict(map=name, block_n=bn, num_warps=warps, num_stages=stages, ms=ms, dense_ms=dense))
            print(f"{name:12s} {bn:4d} {warps:5d} {stages:6d} {ms:8.2f} {ms / dense:8.2f}", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "tune_attention.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
