"""A cheaper estimate: the antidiagonal stride's effect on the estimate's time and on the answer.

    python benchmarks/estimate_stride.py [--lengths 32768,65536] [--strides 8,16] [--out DIR]

On the benchmark's video-like inputs (causal 28/4 heads, D = 128, bf16, the last 256 tokens text),
for the ``video_mme`` preset and quantile sparsities 0.65 and 0.9, each at every stride: the fp8
estimate's time (quantisation included), the achieved sparsity and the PSA output's relative error
against dense SDPA. At stride ``s`` the estimate does ``1/s`` of a dense score pass's
multiply-adds over ``s``-token antidiagonals, so stride 16 halves stride 8's work and reads each
128-token block as 8 rows instead of 16. Prints a table, writes ``estimate_stride.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import psa_kernels
from psa_vlm.compare import video_like_qkv
from psa_vlm.config import load_preset


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="32768,65536")
    parser.add_argument("--strides", default="8,16")
    parser.add_argument("--out", default=None, help="directory for estimate_stride.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("estimate_stride.py times GPU kernels: run it on a machine with CUDA")
    strides = [int(s) for s in args.strides.split(",")]
    rows = []

    def bench(fn):
        return do_bench(fn, warmup=10, rep=50, return_mode="median")

    base = load_preset("video_mme")
    configs = [("video_mme", base)] + [(f"sparsity {s}", base.at_sparsity(s, "quantile")) for s in (0.65, 0.9)]
    print(f"{'L':>6} {'variant':14s} {'stride':>6} {'estimate ms':>11} {'sparsity':>8} {'rel err':>8}", flush=True)
    for L in (int(x) for x in args.lengths.split(",")):
        q, k, v = video_like_qkv(L, 28, 4, 128, seed=0, device="cuda", dtype=torch.bfloat16)
        text = torch.zeros(1, L, dtype=torch.bool, device="cuda")
        text[:, L - 256:] = True
        dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).float()
        for name, cfg in configs:
            for stride in strides:
                kw = dataclasses.replace(cfg, stride=stride).mask_kwargs()
                t = bench(lambda kw=kw: psa_kernels.antidiagonal_importance(
                    q, k, causal=True, block_q=128, block_k=128, stride=kw["stride"],
                    precision=kw["estimate_precision"]))
                layout = psa_kernels.build_level_map(q, k, causal=True, text_mask=text, compact=True, **kw)
                out = psa_kernels.psa_attention(q, k, v, layout, causal=True).float()
                err = ((out - dense).norm() / dense.norm()).item()
                sp = layout.sparsity().mean().item()
                rows.append(dict(L=L, variant=name, stride=stride, estimate_ms=t, sparsity=sp, rel_err=err))
                print(f"{L:6d} {name:14s} {stride:6d} {t:11.3f} {sp:8.3f} {err:8.3f}", flush=True)
    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "estimate_stride.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
