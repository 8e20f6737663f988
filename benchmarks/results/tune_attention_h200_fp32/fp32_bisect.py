"""The script behind launches_16k.txt (run from the repo root on the H200, one process per launch
so that a launch that faults cannot poison the others' CUDA context):

    for c in 64:4:2:64 128:8:2:32 128:8:2:64 64:8:2:32 64:4:3:32; do
        timeout 60 python fp32_bisect.py $c; done
"""
import sys

import torch
from triton.testing import do_bench

import psa_kernels
from psa_kernels.attention import psa_attention_triton
from psa_vlm.compare import video_like_qkv

bm, w, s, bn = map(int, sys.argv[1].split(":"))
L = int(sys.argv[2]) if len(sys.argv) > 2 else 16384
q, k, v = video_like_qkv(L, 28, 4, 128, seed=0, device="cuda", dtype=torch.float32)
m = psa_kernels.LevelMap.from_dense(torch.ones(1, 4, L // 128, L // 128, dtype=torch.int8, device="cuda"), block_q=128,
                                    block_k=128, q_len=L, k_len=L, causal=True)
cfg = dict(block_m=bm, num_warps=w, num_stages=s, block_n=bn)
r = psa_attention_triton(q, k, v, m, causal=True)
torch.cuda.synchronize()
o = psa_attention_triton(q, k, v, m, causal=True, **cfg)
torch.cuda.synchronize()
print(sys.argv[1], "diff", ((o - r).norm() / r.norm()).item(), "ms",
      do_bench(lambda: psa_attention_triton(q, k, v, m, causal=True, **cfg), warmup=5, rep=50), flush=True)
