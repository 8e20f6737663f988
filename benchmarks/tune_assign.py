"""Time the level assignment's launch on a GPU: warps per row, and what the assignment step costs.

    python benchmarks/tune_assign.py [--lengths 32768,65536] [--warps 1,2,4,8] [--out DIR]

On the benchmark's video-like inputs (causal 28/4 heads, D = 128, bf16, the last 256 tokens text),
with the importance estimated once per length, for the ``video_mme`` preset and quantile sparsities
0.65 and 0.9: the assignment step as ``benchmarks/attention.py`` times it (``build_level_map`` with
the scores given: key-block flags and similarity cap, then the assignment and layout kernel), the
key-block launch alone, and the assignment kernel at each warp count. One program owns one
(head, query block) row and sorts its ``nk`` keys twice; every warp count must give the same layout
bit for bit (checked). Prints a table and writes ``tune_assign.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from triton.testing import do_bench

import psa_kernels
import psa_kernels.assign as assign_module
from psa_kernels.key_blocks import key_blocks
from psa_kernels.layout import row_launch
from psa_vlm.compare import video_like_qkv
from psa_vlm.config import load_preset

FIELDS = ("counts", "indices", "plan", "cost", "visible")


def variants():
    yield "video_mme", load_preset("video_mme").mask_kwargs()
    for s in (0.65, 0.9):
        yield f"sparsity {s}", load_preset("video_mme").at_sparsity(s, "quantile").mask_kwargs()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="32768,65536")
    parser.add_argument("--warps", default="1,2,4,8", help="warps per row program to time")
    parser.add_argument("--out", default=None, help="directory for tune_assign.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune_assign.py times GPU kernels: run it on a machine with CUDA")
    warps = [int(w) for w in args.warps.split(",")]
    rows = []

    def bench(fn):
        return do_bench(fn, warmup=10, rep=50, return_mode="median")

    print(f"{'L':>6} {'variant':14s} {'step ms':>8} {'blocks ms':>9} " + " ".join(f"{w}w ms".rjust(8) for w in warps)
          + "  same layout", flush=True)
    for L in (int(x) for x in args.lengths.split(",")):
        q, k, _ = video_like_qkv(L, 28, 4, 128, seed=0, device="cuda", dtype=torch.bfloat16)
        text = torch.zeros(1, L, dtype=torch.bool, device="cuda")
        text[:, L - 256:] = True
        nk = -(-L // 128)
        for name, kw in variants():
            scores = psa_kernels.antidiagonal_importance(q, k, causal=True, block_q=128, block_k=128,
                                                         stride=kw["stride"], precision=kw["estimate_precision"])

            def step(kw=kw, scores=scores):
                return psa_kernels.build_level_map(q, k, causal=True, text_mask=text, scores=scores, compact=True,
                                                   **kw)

            def blocks(kw=kw):
                sim = kw["similarity"]
                return key_blocks(k, q_len=L, block_q=128, block_k=128,
                                  thresholds=dict(zip((2, 4, 8), sim)) if sim is not None else None, text_mask=text,
                                  dense_tail_tokens=kw["dense_tail_tokens"], key_padding_mask=None, min_sims=False)

            want = step()
            row = dict(L=L, variant=name, step_ms=bench(step), blocks_ms=bench(blocks), warps={})
            same = True
            for w in warps:
                assign_module.row_launch = lambda n, w=w: dict(row_launch(n), num_warps=w)
                try:
                    got = step()
                    same &= all(torch.equal(getattr(got, f), getattr(want, f)) for f in FIELDS)
                    row["warps"][w] = bench(step) - row["blocks_ms"]
                finally:
                    assign_module.row_launch = row_launch
            row["same_layout"] = bool(same)
            rows.append(row)
            print(f"{L:6d} {name:14s} {row['step_ms']:8.3f} {row['blocks_ms']:9.3f} "
                  + " ".join(f"{row['warps'][w]:8.3f}" for w in warps) + f"  {same}", flush=True)
    print(f"(per-warp columns: the step's time less the key-block launch's; default launch {row_launch(nk)})")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tune_assign.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
