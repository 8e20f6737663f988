"""GPU check of the budget assignment: fused kernel vs reference on real (video-like) scores, and its time vs the energy/quantile assignment."""
import json, os, sys, torch
sys.path.insert(0, "tests/gpu")
from check_kernels import video_like
import psa_kernels
from psa_kernels import reference
from psa_kernels.importance import antidiagonal_importance_triton
from triton.testing import do_bench
rows = []
for L in (16384, 32768, 65536):
    q = video_like(1, 28, L, 128, 7, "cuda").to(torch.bfloat16)
    k = video_like(1, 4, L, 128, 8, "cuda").to(torch.bfloat16)
    got = antidiagonal_importance_triton(q, k, causal=True, stride=8, precision="fp8")
    cases = {
        "energy video_mme": dict(mode="energy", thresholds=(0.7, 0.8, 0.9, 0.9)),
        "quantile@0.9": dict(mode="quantile", thresholds=(0.05, 0.10, 0.15, 0.25)),
        "budget@0.65": dict(mode="budget", target_sparsity=0.65),
        "budget@0.9": dict(mode="budget", target_sparsity=0.9),
        "topk@0.9": dict(mode="budget", target_sparsity=0.9, levels=(1,), thresholds=(1.0,)),
    }
    for name, extra in cases.items():
        kw = dict(causal=True, scores=got, similarity=(0.75, 0.70, 0.70), min_full_fraction=0.06, **extra)
        fused = psa_kernels.build_level_map(q, k, compact=True, **kw).to_dense()
        ref = reference.build_level_map(q, k, **kw)
        agree = (fused == ref).float().mean().item()
        ms = do_bench(lambda: psa_kernels.build_level_map(q, k, compact=True, **kw), warmup=10, rep=50, return_mode="median")
        row = dict(L=L, case=name, agreement=agree, differing=int((fused != ref).sum()), assign_ms=ms)
        rows.append(row); print(row, flush=True)
        del fused, ref
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "assign_check.json"), "w"), indent=1)
