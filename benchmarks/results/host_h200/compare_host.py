"""Host time of the PSA call: the kernels on PYTHONPATH as ``psa_kernels_old`` against
``psa_kernels``, interleaved in one process (see README.md beside this file). Needs a GPU."""

from __future__ import annotations

import statistics
import time

import psa_kernels
import psa_kernels_old
import torch
import torch.nn.functional as F
from triton.testing import do_bench

from psa_vlm.compare import video_like_qkv
from psa_vlm.config import load_preset


def host_us(fn, calls: int) -> float:
    """Microseconds of host time per call, ``calls`` issued back to back."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    took = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return took


def psa_call(module, q, k, v, text, kw):
    def call():
        layout = module.build_level_map(q, k, causal=True, text_mask=text, compact=True, **kw)
        return module.psa_attention(q, k, v, layout, causal=True)

    return call


def main() -> None:
    device = torch.device("cuda")
    for L in (8192, 16384):
        q, k, v = video_like_qkv(L, 28, 4, 128, seed=0, device=device, dtype=torch.bfloat16)
        text = torch.zeros(1, L, dtype=torch.bool, device=device)
        text[:, L - 256:] = True
        dense = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                         warmup=25, rep=200, return_mode="median")
        for s in (0.65, 0.9):
            kw = load_preset("video_mme").at_sparsity(s, "quantile").mask_kwargs()
            calls = {name: psa_call(module, q, k, v, text, kw)
                     for name, module in (("old", psa_kernels_old), ("new", psa_kernels))}
            same = torch.equal(calls["old"](), calls["new"]())
            host = {name: [] for name in calls}
            bench = {name: [] for name in calls}
            for _ in range(8):
                for name, call in calls.items():
                    host[name].append(host_us(call, 100))
            for _ in range(3):
                for name, call in calls.items():
                    bench[name].append(do_bench(call, warmup=10, rep=100, return_mode="median"))
            for name in calls:
                h, b = sorted(host[name]), sorted(bench[name])
                print(f"L={L} s={s} {name}: host us min {h[0]:.0f} median {statistics.median(h):.0f} max {h[-1]:.0f}"
                      f" | call ms {' '.join(f'{x:.3f}' for x in b)} dense {dense:.3f} -> call/dense median "
                      f"{statistics.median(b) / dense:.3f} | bit-equal {same}", flush=True)


if __name__ == "__main__":
    main()
