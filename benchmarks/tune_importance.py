"""Sweep the antidiagonal importance kernel's launch parameters on a GPU (prints a table, writes JSON).

    python benchmarks/tune_importance.py [--lengths 32768,65536] [--configs 64:128:4:3:0:3:168] [--baseline FILE] [--out DIR]

Causal Qwen2.5-VL-7B text shape (28/4 heads, D=128, bf16), strides 8 and 16, both estimate
precisions (``full``: bf16 products; ``fp8``: the fp8 copies, their quantisation included): the
time of ``antidiagonal_importance_triton`` for each (block_r, block_c, num_warps, num_stages, and
optionally kv_chunk, persistent programs per SM and a register cap ``maxnreg``) against dense SDPA
(CUDA-event medians, warm-up excluded), and the largest difference from the default launch's result
(all launches compute the same thing). Use it to choose ``kernels/importance.py``'s ``LAUNCH``. ``--baseline`` also times another version of the kernel
module (e.g. ``git show HEAD~1:kernels/importance.py > /tmp/old.py``) with its default launch, in the
same process, as the row ``baseline``.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import psa_kernels
from psa_kernels.importance import antidiagonal_importance_triton

#: (block_r, block_c, num_warps, num_stages): the best of the H100 sweep and its neighbours.
CONFIGS = [(64, 128, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 128, 4, 2), (128, 64, 8, 3), (64, 64, 4, 3),
           (128, 128, 4, 3)]


def load_baseline(path: str):
    """Another version of ``kernels/importance.py`` as a module of the package (its relative imports
    resolve to the current ``psa_kernels``)."""
    spec = importlib.util.spec_from_file_location("psa_kernels._baseline_importance", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = psa_kernels.__name__
    spec.loader.exec_module(module)
    return module.antidiagonal_importance_triton


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="32768,65536")
    parser.add_argument("--strides", default="8,16")
    parser.add_argument("--precisions", default="full,fp8", help="comma list of full, fp8")
    parser.add_argument("--configs", default="",
                        help="launches to time as block_r:block_c:num_warps:num_stages[:kv_chunk[:programs_per_sm"
                             "[:maxnreg]]], comma-separated (default: CONFIGS); 0 in an optional field takes the "
                             "kernel's default (every pair per chunk, LAUNCH's programs per SM, no register cap)")
    parser.add_argument("--baseline", default="", help="another version of kernels/importance.py to time beside")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    fields = "block_r:block_c:num_warps:num_stages[:kv_chunk[:programs_per_sm[:maxnreg]]]"
    try:
        configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",") if c] or CONFIGS
    except ValueError:
        parser.error(f"--configs {args.configs!r}: give integers as {fields}")
    if any(not 4 <= len(c) <= 7 for c in configs):
        parser.error(f"--configs {args.configs!r}: each launch is {fields} (0 in an optional field: the default)")
    configs = [tuple(c) + (0,) * (7 - len(c)) for c in configs]
    if args.baseline and not Path(args.baseline).is_file():
        parser.error(f"--baseline {args.baseline}: no such file (e.g. git show HEAD~1:kernels/importance.py > old.py)")
    baseline = load_baseline(args.baseline) if args.baseline else None
    rows = []
    print(f"{'L':>6s} {'stride':>6s} {'prec':5s} {'block_r':>7s} {'block_c':>7s} {'warps':>5s} {'stages':>6s} "
          f"{'chunk':>5s} {'/SM':>4s} {'regs':>5s} {'ms':>8s} {'x dense':>8s} {'max diff':>9s}")
    for L in (int(x) for x in args.lengths.split(",")):
        q = torch.randn(1, 28, L, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 4, L, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        dense = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                         warmup=25, rep=100, return_mode="median")
        for stride, precision in itertools.product((int(x) for x in args.strides.split(",")),
                                                   args.precisions.split(",")):
            ref = antidiagonal_importance_triton(q, k, causal=True, stride=stride, precision=precision)
            sms = torch.cuda.get_device_properties(q.device).multi_processor_count
            runs = [(c, dict(block_r=c[0], block_c=c[1], num_warps=c[2], num_stages=c[3], kv_chunk=c[4] or None,
                             programs=c[5] * sms or None, maxnreg=c[6] or None),
                     antidiagonal_importance_triton) for c in configs]
            if baseline is not None:
                runs.append((("baseline",) * 7, {}, baseline))
            for (br, bc, warps, stages, chunk, per_sm, maxnreg), launch, fn in runs:
                kw = dict(causal=True, stride=stride, precision=precision, **launch)
                try:
                    diff = (fn(q, k, **kw) - ref).abs().max().item()
                    ms = do_bench(lambda: fn(q, k, **kw), warmup=10, rep=50, return_mode="median")
                except Exception as err:  # noqa: BLE001 - a config that does not fit is skipped
                    print(f"{L:6d} {stride:6d} {precision:5s} {br!s:>7s} {bc!s:>7s} {warps!s:>5s} {stages!s:>6s} "
                          f"{chunk!s:>5s} {per_sm!s:>4s} {maxnreg!s:>5s}  failed: {type(err).__name__}: {str(err)[:100]}", flush=True)
                    continue
                rows.append(dict(L=L, stride=stride, precision=precision, block_r=br, block_c=bc, num_warps=warps,
                                 num_stages=stages, kv_chunk=chunk, programs_per_sm=per_sm, maxnreg=maxnreg, ms=ms, dense_ms=dense, max_diff=diff))
                print(f"{L:6d} {stride:6d} {precision:5s} {br!s:>7s} {bc!s:>7s} {warps!s:>5s} {stages!s:>6s} "
                      f"{chunk!s:>5s} {per_sm!s:>4s} {maxnreg!s:>5s} {ms:8.3f} {ms / dense:8.3f} {diff:9.1e}", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "tune_importance.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
