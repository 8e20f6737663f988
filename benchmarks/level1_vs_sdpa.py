"""PSA kernel quality on dense work: every visible pair at level 1 vs dense SDPA (GPU).

    python benchmarks/level1_vs_sdpa.py [--lengths 16384,32768,65536] [--rounds 5]

Causal 28/4 heads, D=128, bf16; the level map lists every block (the kernel skips the ones above
the diagonal). ``psa_kernels.psa_attention`` with a prebuilt LevelMap (the pyramid and launch
included) against SDPA with ``is_causal``, timed in interleaved rounds (PSA, SDPA, PSA, ...) of
CUDA-event medians over at least 0.5 s each, so that a drift of the GPU's clocks reaches both: a
64k call takes about 50 ms, and one short timing of each (the form before) moved the ratio by 10%
between runs. Prints each round's ratio and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import psa_kernels
from psa_kernels import LevelMap


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="16384,32768,65536")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per length (default 5)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    for L in (int(x) for x in args.lengths.split(",")):
        q = torch.randn(1, 28, L, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 4, L, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        layout = LevelMap.from_dense(torch.ones(1, 4, -(-L // 128), -(-L // 128), dtype=torch.int8, device="cuda"),
                                     block_q=128, block_k=128, q_len=L, k_len=L, causal=True)
        out = psa_kernels.psa_attention(q, k, v, layout, causal=True)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        calls = {"psa": lambda: psa_kernels.psa_attention(q, k, v, layout, causal=True),
                 "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)}
        times = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, fn in calls.items():
                times[name].append(do_bench(fn, warmup=25, rep=500, return_mode="median"))
        psa, sdpa = statistics.median(times["psa"]), statistics.median(times["sdpa"])
        rounds = " ".join(f"{p / s:.3f}" for p, s in zip(times["psa"], times["sdpa"]))
        print(f"L={L}: all level 1 {psa:.2f} ms, dense SDPA {sdpa:.2f} ms, ratio {psa / sdpa:.3f} "
              f"(rounds: {rounds}), rel err {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
