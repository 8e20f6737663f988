"""One PSA call's kernels, launched once each after a warm-up, for Nsight Compute to read.

    ncu --clock-control none -k regex:'_antidiagonal_kernel|_psa_fwd_kernel' --launch-skip 4 \\
        --launch-count 3 --section SpeedOfLight --section WarpStateStats -o REPORT \\
        python benchmarks/ncu_target.py --length 65536 --sparsity 0.65

The causal Qwen2.5-VL-7B text shape (28/4 heads, D=128, bf16) on video-like inputs, as in
``benchmarks/attention.py``. Launches of the two kernels in order: the estimate the maps are built
from, a warm-up round (estimate, attention on the pyramid map, attention on the binary map of the
same FLOPs), then the same three once more: with ``--launch-skip 4 --launch-count 3`` ncu profiles
the second round only (compiled and cached). Hardware counters say what binds a kernel (tensor
pipe, L2, issue stalls), which timing alone cannot.
"""

from __future__ import annotations

import argparse

import torch

import psa_kernels
from psa_vlm.compare import binary_map_at_same_flops, video_like_qkv
from psa_vlm.config import load_preset


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=65536, help="tokens (default 65536)")
    parser.add_argument("--sparsity", type=float, default=0.65, help="fixed sparsity of the level map")
    parser.add_argument("--device", default="cuda", help="cuda (what ncu profiles); cpu only to try the script")
    args = parser.parse_args(argv)
    if args.length <= 256:
        parser.error(f"--length {args.length}: give more than 256 tokens (the last 256 are the text tail)")
    if not 0 <= args.sparsity < 1:
        parser.error(f"--sparsity {args.sparsity}: give a sparsity in [0, 1)")
    L, device = args.length, args.device
    q, k, v = video_like_qkv(L, 28, 4, 128, seed=0, device=device, dtype=torch.bfloat16)
    text = torch.zeros(1, L, dtype=torch.bool, device=device)
    text[:, L - 256:] = True
    kw = load_preset("video_mme").at_sparsity(args.sparsity, "quantile").mask_kwargs()
    def estimate():
        return psa_kernels.antidiagonal_importance(q, k, causal=True, block_q=128, block_k=128, stride=kw["stride"],
                                                   precision=kw["estimate_precision"])

    scores = estimate()  # the one estimate before the rounds: the map is built from it
    layout = psa_kernels.build_level_map(q, k, causal=True, text_mask=text, scores=scores, compact=True, **kw)
    sp = layout.sparsity().mean().item()
    binary = binary_map_at_same_flops(scores, 1.0 - sp, q_len=L, k_len=L, block_q=128, block_k=128, causal=True,
                                      text_mask=text, kv_heads=4 if kw["share_kv_group"] else None)
    binary_layout = psa_kernels.LevelMap.from_dense(binary, block_q=128, block_k=128, q_len=L, k_len=L, causal=True)
    for _ in range(2):  # warm-up round, then the profiled one
        estimate()
        psa_kernels.psa_attention(q, k, v, layout, causal=True)
        psa_kernels.psa_attention(q, k, v, binary_layout, causal=True)
        if device == "cuda":
            torch.cuda.synchronize()
    print(f"L={L} sparsity {sp:.3f}: estimate, attention (pyramid map), attention (binary map of the same FLOPs)")


if __name__ == "__main__":
    main()
