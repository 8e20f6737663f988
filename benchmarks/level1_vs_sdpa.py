"""PSA kernel quality on dense work: every visible pair at level 1 vs dense SDPA (GPU).

    python benchmarks/level1_vs_sdpa.py [--lengths 32768,65536]

Causal 28/4 heads, D=128, bf16; the level map lists every block (the kernel skips the ones above
the diagonal). CUDA-event medians (warm-up excluded) of ``psa_kernels.psa_attention`` with a
prebuilt LevelMap (the pyramid and launch included) and of SDPA with ``is_causal``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import psa_kernels
from psa_kernels import LevelMap


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="32768,65536")
    args = parser.parse_args()
    for L in (int(x) for x in args.lengths.split(",")):
        q = torch.randn(1, 28, L, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 4, L, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        layout = LevelMap.from_dense(torch.ones(1, 4, L // 128, L // 128, dtype=torch.int8, device="cuda"),
                                     block_q=128, block_k=128, q_len=L, k_len=L, causal=True)
        out = psa_kernels.psa_attention(q, k, v, layout, causal=True)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        psa = do_bench(lambda: psa_kernels.psa_attention(q, k, v, layout, causal=True), warmup=25, rep=100,
                       return_mode="median")
        sdpa = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), warmup=25,
                        rep=100, return_mode="median")
        print(f"L={L}: all level 1 {psa:.2f} ms, dense SDPA {sdpa:.2f} ms, ratio {psa / sdpa:.3f}, rel err {err:.1e}",
              flush=True)


if __name__ == "__main__":
    main()
