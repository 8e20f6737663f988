"""Where one whole PSA call's time goes on a GPU: each kernel's GPU time, the host's time to issue
the call, and the call's measured time, beside dense SDPA (prints a table, writes JSON).

    python benchmarks/profile_call.py [--lengths 8192,16384] [--sparsity 0.65,0.9] [--host-breakdown] [--out DIR]

The call is what the ``"psa"`` hook runs per layer (mask generation from q and k, then the
attention), on the causal Qwen2.5-VL-7B text shape (28/4 heads, D=128, bf16) and video-like
inputs, as in ``benchmarks/attention.py``. Three views of it:

- ``gpu ms``: the sum of its kernels' GPU times (``torch.profiler``), per kernel as well;
- ``host ms``: the host's time to issue one call, measured over calls issued back to back
  without waiting for the GPU. When it exceeds ``gpu ms`` the call is host-bound: the GPU waits
  for the launches;
- ``call ms``: ``triton.testing.do_bench``'s median (what the attention benchmark reports).

Use it to see whether a short call's cost is its kernels or its launches.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench

import psa_kernels
from psa_vlm.compare import video_like_qkv
from psa_vlm.config import load_preset


def kernel_times(fn, calls: int) -> dict[str, float]:
    """GPU milliseconds per call of each kernel ``fn`` launches (``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time / 1e3 / calls
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def host_ms(fn, calls: int) -> float:
    """Host milliseconds to issue one call (back to back, no synchronisation in between)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter() - start
    torch.cuda.synchronize()
    return issued * 1e3 / calls


def print_host_profile(fn, calls: int, top: int = 30) -> None:
    """The host's time per call by Python function (cumulative), issuing ``calls`` calls."""
    import cProfile
    import pstats

    fn()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(top)


@triton.jit
def _noop(X, a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p, r, s, t, u, w, y, z, aa,  # noqa: E741
          N: tl.constexpr):
    pass


def host_breakdown(call, q, k, v, text, kw, calls: int) -> dict[str, float]:
    """Host microseconds to issue the whole ``call``, each of its stages alone, a bare Triton
    launch and the allocations and descriptors a call makes: where the host's time goes."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from psa_kernels.importance import quantize_qk
    from psa_kernels.pyramid import build_device_pyramid

    layout = psa_kernels.build_level_map(q, k, causal=True, text_mask=text, compact=True, **kw)
    stages = {
        "whole call": call,
        "build_level_map": lambda: psa_kernels.build_level_map(q, k, causal=True, text_mask=text, compact=True, **kw),
        "psa_attention (map given)": lambda: psa_kernels.psa_attention(q, k, v, layout, causal=True),
        "quantize_qk(q, k)": lambda: quantize_qk(q, k, 8),
        "build_device_pyramid": lambda: build_device_pyramid(k, v),
        "bare launch, 25 scalar args": lambda: _noop[(1,)](q, *range(1, 25), N=1),
        "torch.empty (1 tensor)": lambda: torch.empty(1024, device=q.device),
        "TensorDescriptor (1)": lambda: TensorDescriptor(k, shape=list(k.shape), strides=list(k.stride()),
                                                         block_shape=[1, 1, 64, 128]),
    }
    out = {}
    for name, fn in stages.items():
        out[name] = min(host_ms(fn, calls) for _ in range(5)) * 1e3  # best of 5: the host is shared and noisy
        print(f"    host {out[name]:8.1f} us  {name}", flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="8192,16384", help="comma-separated token counts")
    parser.add_argument("--sparsity", default="0.65,0.9", help="comma-separated target sparsities")
    parser.add_argument("--preset", default="video_mme", help="preset whose settings the calls use")
    parser.add_argument("--calls", type=int, default=20, help="calls per measurement (default 20)")
    parser.add_argument("--host-profile", action="store_true",
                        help="also print the Python functions that take the host's time (cProfile, top 30)")
    parser.add_argument("--host-breakdown", action="store_true",
                        help="also time the host's issue of each stage alone, a bare launch, an allocation and a "
                             "tensor descriptor (best of 5 rounds)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    device = torch.device("cuda")
    rows = []
    for L in (int(x) for x in args.lengths.split(",")):
        q, k, v = video_like_qkv(L, 28, 4, 128, seed=0, device=device, dtype=torch.bfloat16)
        text = torch.zeros(1, L, dtype=torch.bool, device=device)
        text[:, L - 256:] = True
        dense_ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                            warmup=25, rep=100, return_mode="median")
        for s in (float(x) for x in args.sparsity.split(",")):
            kw = load_preset(args.preset).at_sparsity(s, "quantile").mask_kwargs()

            def call():
                layout = psa_kernels.build_level_map(q, k, causal=True, text_mask=text, compact=True, **kw)
                return psa_kernels.psa_attention(q, k, v, layout, causal=True)

            kernels = kernel_times(call, args.calls)
            row = dict(L=L, sparsity=s, dense_ms=dense_ms, gpu_ms=sum(kernels.values()), host_ms=host_ms(call, args.calls),
                       call_ms=do_bench(call, warmup=25, rep=100, return_mode="median"), kernels=kernels)
            rows.append(row)
            print(f"\nL {L}  sparsity {s}: dense {dense_ms:.3f} ms  call {row['call_ms']:.3f}  "
                  f"gpu {row['gpu_ms']:.3f}  host {row['host_ms']:.3f}  (call / dense {row['call_ms'] / dense_ms:.2f},"
                  f" gpu / dense {row['gpu_ms'] / dense_ms:.2f})", flush=True)
            for name, ms in kernels.items():
                print(f"    {ms:8.3f} ms  {name[:90]}")
            if args.host_profile:
                print_host_profile(call, args.calls)
            if args.host_breakdown:
                row["host_us"] = host_breakdown(call, q, k, v, text, kw, args.calls)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "profile_call.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
