"""Sweep the PSA attention kernel's launches on a GPU (prints a table, writes JSON).

    python benchmarks/tune_attention.py [--lengths 32768] [--out DIR]

Causal 28/4 heads, D=128, bf16, video-like inputs (``psa_vlm.compare``). Level maps: every pair
at level 1 (dense work), the mask generator's maps at fixed sparsities 0.65 and 0.9, and the
binary block-sparse map of the same FLOPs as the 0.9 one. For every launch of :data:`VARIANTS`
(``block_m`` x ``num_warps``, ``num_stages``, ``block_n``) the time of
``psa_attention_triton`` with the layout prebuilt (pyramid and launch included), CUDA-event
medians with warm-up excluded, against dense SDPA, FlexAttention on the binary map, and a plain
causal flash-attention kernel in Triton (the ceiling this Triton reaches). Every variant's output
is checked against the first one's. Use it to choose :func:`psa_kernels.attention.launch_config`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psa_kernels  # noqa: E402
from psa_kernels.attention import psa_attention_triton  # noqa: E402
from psa_vlm.compare import binary_map_at_same_flops, video_like_qkv  # noqa: E402
from psa_vlm.config import load_preset  # noqa: E402

VARIANTS = [
    dict(block_m=128, num_warps=4, num_stages=2, block_n=64),
    dict(block_m=128, num_warps=8, num_stages=3, block_n=64),
    dict(block_m=128, num_warps=8, num_stages=2, block_n=64),
    dict(block_m=64, num_warps=4, num_stages=3, block_n=64),
    dict(block_m=128, num_warps=8, num_stages=2, block_n=128),
]


def label(cfg: dict) -> str:
    """A launch in a few characters: m128 w4 s2 n64."""
    return f"m{cfg['block_m']:3d} w{cfg['num_warps']} s{cfg['num_stages']} n{cfg['block_n']:3d}"


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
    q = q.contiguous()
    out = torch.empty_like(q)
    k, v = k.contiguous(), v.contiguous()
    desc = [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, D]) for t in (k, v)]
    _plain_flash[(L // 128, B * Hq)](q, *desc, out, D**-0.5 * 1.4426950408889634, Hq, Hq // k.shape[1], L,
                                     BLOCK_M=128, BLOCK_N=block_n, D=D, num_warps=num_warps, num_stages=num_stages)
    return out


def maps(q, k, L):
    """(name, LevelMap) pairs: all level 1, generated at 0.65 and 0.9, binary at 0.9's FLOPs."""
    nq = nk = L // 128
    text = torch.zeros(1, L, dtype=torch.bool, device=q.device)
    text[:, L - 256:] = True
    ones = torch.ones(1, 4, nq, nk, dtype=torch.int8, device=q.device)
    yield "all level 1", psa_kernels.LevelMap.from_dense(ones, block_q=128, block_k=128, q_len=L, k_len=L, causal=True)
    for s in (0.65, 0.9):
        kw = load_preset("video_mme").at_sparsity(s).mask_kwargs()
        layout = psa_kernels.build_level_map(q, k, causal=True, text_mask=text, compact=True, **kw)
        yield f"pyramid {s}", layout
    scores = psa_kernels.antidiagonal_importance(q, k, causal=True, precision="fp8")
    binary = binary_map_at_same_flops(scores, 1.0 - layout.sparsity().mean().item(), q_len=L, k_len=L, block_q=128,
                                      block_k=128, causal=True, text_mask=text)
    yield "binary @0.9 FLOPs", psa_kernels.LevelMap.from_dense(binary, block_q=128, block_k=128, q_len=L, k_len=L,
                                                               causal=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="32768")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--plain-flash", action="store_true", help="also time the plain Triton flash kernel")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"),
                        help="input dtype (fp32: three-TF32 dots, the launches of launch_config's fp32 branch)")
    parser.add_argument("--variants", default="",
                        help="launches to time as block_m:num_warps:num_stages:block_n, comma-separated "
                             "(default: VARIANTS)")
    args = parser.parse_args()
    variants = []
    for v in (v for v in args.variants.split(",") if v):
        parts = v.split(":")
        if len(parts) != 4 or not all(x.isdigit() and int(x) > 0 for x in parts):
            parser.error(f"--variants takes block_m:num_warps:num_stages:block_n (positive ints), got {v!r}")
        variants.append(dict(zip(("block_m", "num_warps", "num_stages", "block_n"), map(int, parts))))
    variants = variants or VARIANTS
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    rows = []
    for L in (int(x) for x in args.lengths.split(",")):
        q, k, v = video_like_qkv(L, 28, 4, 128, seed=0, device="cuda", dtype=dtype)
        bench = lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
        dense = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        print(f"L={L} dense SDPA {dense:.2f} ms", flush=True)
        if args.plain_flash:
            for bn, warps, stages in ((64, 8, 2), (64, 8, 3), (128, 8, 2)):
                try:
                    ms = bench(lambda: plain_flash(q, k, v, bn, warps, stages))
                except Exception as exc:  # noqa: BLE001
                    print(f"plain flash {bn}/{warps}/{stages} failed: {type(exc).__name__}: {str(exc)[:120]}")
                    continue
                rows.append(dict(L=L, map="plain flash (no PSA)", block_n=bn, num_warps=warps, num_stages=stages,
                                 ms=ms, dense_ms=dense))
                print(f"L={L} plain flash bn={bn} warps={warps} stages={stages}: {ms:.2f} ms ({ms / dense:.2f}x)",
                      flush=True)
        for name, layout in maps(q, k, L):
            sparsity = layout.sparsity().mean().item()
            reference = None
            for cfg in variants:
                try:
                    out = psa_attention_triton(q, k, v, layout, causal=True, **cfg)
                    if reference is None:
                        reference = out
                    diff = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
                    ms = bench(lambda: psa_attention_triton(q, k, v, layout, causal=True, **cfg))
                except Exception as exc:  # noqa: BLE001 - a launch that does not fit is reported and skipped
                    print(f"L={L} {name:18s} {cfg} failed: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                    continue
                rows.append(dict(L=L, map=name, sparsity=sparsity, **cfg, ms=ms, dense_ms=dense, diff=diff,
                                 dtype=args.dtype))
                print(f"L={L} {name:18s} sp {sparsity:.3f} {label(cfg)}: {ms:7.2f} ms  {ms / dense:5.2f}x dense  "
                      f"ideal {(1 - sparsity):.2f}x  diff {diff:.1e}", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "tune_attention.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
