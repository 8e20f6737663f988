"""Peak GPU memory of one PSA call, piece by piece and per attention kernel (GPU only).

    python benchmarks/memory_call.py [--length 65536] [--video-like] [--trace] [--out DIR]

Causal 28/4 heads, D=128, bf16, the ``video_mme`` preset, contiguous inputs (with ``--video-like``
the memory check's own: fields permuted to ``[1, H, L, D]``). For dense SDPA, the
mask generation alone, the pyramid alone, and then for each attention kernel the op can pick
(``PSA_ATTENTION_KERNEL`` = ``triton`` and ``auto``, the Hopper kernel on Hopper GPUs): the
attention alone on a prebuilt map (three calls, to see growth between calls) and the whole call
(mask generation + attention, twice). Each row: the peak above what was allocated before the
call, and what stays allocated after it returns (its output dropped), in MiB. This is the
breakdown behind ``tests/gpu/check_kernels.py``'s memory section (whole call <= 1.3x the dense
call's increment at 64k). With ``--trace``, the whole call on the picked kernel runs once more
under the allocator's history and the tensors alive at its peak are listed with the line of the
package that made them (largest first).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MIB = 2**20


def peak(fn) -> tuple[float, float]:
    """(peak above the allocation before ``fn``, allocation left after it) in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    del result
    return (torch.cuda.max_memory_allocated() - base) / MIB, (torch.cuda.memory_allocated() - base) / MIB


def live_at_peak(fn, top: int = 12) -> list[dict]:
    """Run ``fn`` under the CUDA allocator's history; the allocations alive at the peak that
    ``fn`` made, largest first, each with the innermost frame of this repository that made it."""
    root = str(Path(__file__).resolve().parent.parent)
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=200_000)
    try:
        result = fn()
        torch.cuda.synchronize()
        del result
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    live, total, best, at_best = {}, 0, 0, {}
    for event in snapshot["device_traces"][0]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
        elif event["action"] in ("free_requested", "free_completed") and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
        if total > best:
            best, at_best = total, dict(live)

    def where(event):
        # The package may be imported through a link (psa_kernels -> kernels/): match its name too.
        frames = [f for f in event.get("frames", [])
                  if f["filename"].startswith(root) or "psa_kernels" in f["filename"] or "psa_vlm" in f["filename"]]
        frames = frames or event.get("frames") or [{"filename": "?", "line": 0, "name": "?"}]
        return " < ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in frames[:3])

    rows = sorted(({"mib": e["size"] / MIB, "where": where(e)} for e in at_best.values()), key=lambda r: -r["mib"])
    print(f"  peak of the traced call: +{best / MIB:.1f} MiB; alive then:")
    for r in rows[:top]:
        print(f"    {r['mib']:8.1f} MiB  {r['where']}")
    return rows[:top]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=65536, help="tokens (queries = keys)")
    parser.add_argument("--out", default=None, help="folder for memory_call.json")
    parser.add_argument("--trace", action="store_true", help="list what is alive at the whole call's peak")
    parser.add_argument("--video-like", action="store_true",
                        help="q and k as tests/gpu/check_kernels.py's memory check makes them (default: randn)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("memory_call.py measures GPU memory: run it on a machine with CUDA")
    import torch.nn.functional as F

    import psa_kernels
    from psa_kernels.ops import KERNEL_ENV
    from psa_kernels.pyramid import build_device_pyramid
    from psa_vlm.config import load_preset

    L, Hq, Hkv, D = args.length, 28, 4, 128
    if args.video_like:
        from tests.gpu.check_kernels import video_like

        q = video_like(1, Hq, L, D, 21, "cuda").to(torch.bfloat16)
        k = video_like(1, Hkv, L, D, 22, "cuda").to(torch.bfloat16)
    else:
        q = torch.randn(1, Hq, L, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    kw = load_preset("video_mme").mask_kwargs()
    rows = []

    def row(name, fn):
        top, left = peak(fn)
        rows.append(dict(name=name, peak_mib=top, left_mib=left))
        print(f"{name:40s} peak +{top:8.1f} MiB  left +{left:7.1f} MiB", flush=True)

    print(f"L {L}: q {q.numel() * 2 / MIB:.0f} MiB, k and v {k.numel() * 2 / MIB:.0f} MiB each")
    layout = psa_kernels.build_level_map(q, k, causal=True, compact=True, **kw)
    row("dense SDPA", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    row("mask generation", lambda: psa_kernels.build_level_map(q, k, causal=True, compact=True, **kw))
    row("pyramid", lambda: build_device_pyramid(k, v))
    before = os.environ.get(KERNEL_ENV)
    try:
        for choice in ("triton", "auto"):
            os.environ[KERNEL_ENV] = choice
            kernel = psa_kernels.attention_kernel(q)
            for i in range(3):
                row(f"attention [{kernel}] call {i + 1}",
                    lambda: psa_kernels.psa_attention(q, k, v, layout, causal=True))

            def whole():
                level_map = psa_kernels.build_level_map(q, k, causal=True, compact=True, **kw)
                return psa_kernels.psa_attention(q, k, v, level_map, causal=True)

            for i in range(2):
                row(f"whole call [{kernel}] call {i + 1}", whole)
            if args.trace:
                rows.append(dict(name=f"whole call [{kernel}] alive at peak", alive=live_at_peak(whole)))
    finally:
        if before is None:
            os.environ.pop(KERNEL_ENV, None)
        else:
            os.environ[KERNEL_ENV] = before
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "memory_call.json").write_text(json.dumps(dict(L=L, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
