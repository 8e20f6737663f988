"""Attention benchmark: dense SDPA vs FlexAttention block-sparse vs PSA (estimate / assign / attend).

    python benchmarks/attention.py [--lengths 4096,8192,...] [--out DIR] [--smoke]

For each length and shape (causal 28/4 heads D=128, the Qwen2.5-VL-7B text tower; bidirectional
16/16 D=80, its vision tower), on random and on video-like inputs:

- dense: ``F.scaled_dot_product_attention`` (GQA through ``enable_gqa``);
- PSA at each preset (``video_mme``, ``fast``) and at fixed sparsities 0.5 / 0.65 / 0.8 / 0.9 /
  0.95 (quantile mode, level fractions 1:1:1:2 for p = 1, 2, 4, 8 while they fit; the
  ``video_mme`` preset's estimator; ``--policies budget`` adds the budget-aware assignment at the
  same sparsities): time of the importance estimate, the level assignment (with
  the compact layout), the attention, their sum, and the whole call as the ``"psa"`` hook makes
  it (``call``: mask generation from q and k, then the attention, timed as one, so Python and
  launch costs count), and that call captured in a CUDA graph and replayed (``call_graph_ms``: the
  GPU's own time; ``call_ms - call_graph_ms`` is what the host adds to a call timed alone), the
  mask generation alone (estimate + assignment from q and k) replayed the same way
  (``mask_graph_ms``: its GPU time, without the launch costs that bound it at short lengths);
  relative error vs dense on the same inputs; achieved sparsity; peak memory and
  the call's own increment;
- binary block-sparse at the same FLOPs as each PSA run: the top blocks per query row by the
  same importance, through FlexAttention with a ``BlockMask`` (compiled; the tool a user would
  pick instead), attend-only time and relative error.

Video-like inputs (``psa_vlm.compare.video_like``): queries and keys are a smooth spatio-temporal field (frames
of ``grid x grid`` tokens whose features vary slowly in time and space) plus noise, with
``text_tokens`` random tokens appended at the end (the question), so masks look like real ones:
neighbouring tokens are similar (pooling is allowed) and attention concentrates.

Timing: ``triton.testing.do_bench`` medians (CUDA events, warm-up excluded). Prints a table,
writes ``attention.json`` and ``attention.png`` (time vs length, time vs sparsity) to ``--out``.
``--smoke`` runs tiny sizes on whatever device is there (CPU: the reference and Triton's
interpreter), to check the script itself; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import psa_kernels
from psa_vlm.compare import binary_map_at_same_flops, video_like_qkv
from psa_vlm.config import load_preset

FIXED_SPARSITIES = (0.5, 0.65, 0.8, 0.9, 0.95)
SHAPES = {
    "text-causal": dict(Hq=28, Hkv=4, D=128, causal=True),
    "vision-bidir": dict(Hq=16, Hkv=16, D=80, causal=False),
}


# ------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------


def make_inputs(kind, L, shape, *, seed, device, dtype):
    Hq, Hkv, D = shape["Hq"], shape["Hkv"], shape["D"]
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(1, h, L, D, generator=g).to(device, dtype) for h in (Hq, Hkv, Hkv))
    return video_like_qkv(L, Hq, Hkv, D, seed=seed, device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------


def bench(fn, device):
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()  # CPU (smoke runs): one call, wall clock
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def peak_mb(fn, device):
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def increment_mb(fn, device):
    """Peak memory above what was allocated before the call (the call's own footprint)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


# ------------------------------------------------------------------------------------------
# Level maps
# ------------------------------------------------------------------------------------------


def psa_variants(presets, policies=("quantile",)):
    for name in presets:
        cfg = load_preset(name)
        yield name, cfg.mask_kwargs()
    for policy in policies:
        for s in FIXED_SPARSITIES:
            label = f"sparsity {s}" if policy == "quantile" else f"{policy} {s}"
            yield label, load_preset("video_mme").at_sparsity(s, policy).mask_kwargs()


def mask_kwargs_without_importance(kw):
    return {k: v for k, v in kw.items() if k not in ("estimator", "stride")}


# ------------------------------------------------------------------------------------------
# FlexAttention
# ------------------------------------------------------------------------------------------


def flex_runner(q, k, v, binary_map, *, causal, block, compile_):
    """FlexAttention over the selected blocks: whole visible blocks as full blocks, diagonal
    ones as partial blocks (causal mask). The mask function also reads the map, so the eager
    path (which evaluates it everywhere) computes the same thing."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    Lq, Lk = q.shape[2], k.shape[2]
    nq, nk = binary_map.shape[-2:]
    offset = Lk - Lq
    selected = binary_map > 0
    j = torch.arange(nk, device=q.device)
    if causal:
        first_q = torch.arange(nq, device=q.device) * block + offset
        whole = ((j[None, :] + 1) * block - 1 <= first_q[:, None]) & ((j + 1) * block <= Lk)[None, :]
    else:
        whole = ((j + 1) * block <= Lk)[None, :].expand(nq, nk)
    full, partial = selected & whole, selected & ~whole

    def layout(m):
        order = torch.argsort(torch.where(m, 0, 1) * nk + j, dim=-1)
        return m.sum(-1).to(torch.int32), order.to(torch.int32).contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        keep = binary_map[b, h, q_idx // block, kv_idx // block] > 0
        return keep & (kv_idx <= q_idx + offset) if causal else keep

    block_mask = BlockMask.from_kv_blocks(*layout(partial), *layout(full), BLOCK_SIZE=block, mask_mod=mask_mod,
                                          seq_lengths=(Lq, Lk))
    attend = torch.compile(flex_attention, dynamic=False) if compile_ else flex_attention
    gqa = q.shape[1] != k.shape[1]
    return lambda: attend(q, k, v, block_mask=block_mask, enable_gqa=gqa)


# ------------------------------------------------------------------------------------------
# One configuration
# ------------------------------------------------------------------------------------------


def graph_ms(fn, device):
    """Median time of ``fn`` captured in a CUDA graph and replayed: the GPU's own time, without the
    Python and launch cost of each call (what a caller that captures its forward pays)."""
    if device.type != "cuda":
        return float("nan")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay, device)


def run_case(kind, shape_name, L, presets, *, device, dtype, compile_flex, seed=0, policies=("quantile",)):
    shape = SHAPES[shape_name]
    causal = shape["causal"]
    q, k, v = make_inputs(kind, L, shape, seed=seed, device=device, dtype=dtype)
    dense_fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal,  # noqa: E731
                                                      enable_gqa=shape["Hq"] != shape["Hkv"])
    dense = dense_fn()
    row = dict(kind=kind, shape=shape_name, L=L, dense_ms=bench(dense_fn, device), dense_peak_mb=peak_mb(dense_fn, device),
               dense_increment_mb=increment_mb(dense_fn, device), dense_graph_ms=graph_ms(dense_fn, device),
               variants=[])
    bq = bk = 128
    text = torch.zeros(1, L, dtype=torch.bool, device=device)
    text[:, L - 256:] = kind == "video-like" and causal
    binaries = []
    # Every PSA timing first, FlexAttention's compilations after: torch.compile's worker
    # processes would otherwise compete for the CPU with the PSA calls being timed.
    for name, kw in psa_variants(presets, policies):
        stride, precision = kw["stride"], kw["estimate_precision"]
        estimate = lambda: psa_kernels.antidiagonal_importance(q, k, causal=causal, block_q=bq,  # noqa: E731
                                                               block_k=bk, stride=stride, precision=precision)
        scores = estimate()

        def assign():  # level map in the compact layout the attention kernel reads
            return psa_kernels.build_level_map(q, k, causal=causal, text_mask=text, scores=scores, compact=True,
                                               **kw)

        def mask():  # estimate + assignment from q and k, as the call makes them
            return psa_kernels.build_level_map(q, k, causal=causal, text_mask=text, compact=True, **kw)

        def call():  # what the "psa" hook runs per layer: mask generation from q, k and the attention
            return psa_kernels.psa_attention(q, k, v, mask(), causal=causal)

        layout = assign()
        attend = lambda: psa_kernels.psa_attention(q, k, v, layout, causal=causal)  # noqa: E731
        out = attend()
        t_est, t_assign, t_attend, t_call = (bench(f, device) for f in (estimate, assign, attend, call))
        sp = layout.sparsity().mean().item()
        variant = dict(name=name, sparsity=sp, estimate_ms=t_est, assign_ms=t_assign, attend_ms=t_attend,
                       total_ms=t_est + t_assign + t_attend, call_ms=t_call, call_graph_ms=graph_ms(call, device),
                       mask_graph_ms=graph_ms(mask, device),
                       rel_err=rel_err(out, dense), peak_mb=peak_mb(call, device),
                       call_increment_mb=increment_mb(call, device))
        # Binary block-sparse at the same FLOPs, from the same importance.
        binary = binary_map_at_same_flops(scores, 1.0 - sp, q_len=L, k_len=L, block_q=bq, block_k=bk, causal=causal,
                                          text_mask=text, kv_heads=shape["Hkv"] if kw["share_kv_group"] else None)
        # The same binary map through the PSA kernel: its speed on level-1 work beside Flex's.
        binary_layout = psa_kernels.LevelMap.from_dense(binary, block_q=bq, block_k=bk, q_len=L, k_len=L,
                                                        causal=causal)
        variant["psa_binary_ms"] = bench(lambda: psa_kernels.psa_attention(q, k, v, binary_layout, causal=causal),
                                         device)
        binaries.append(binary)
        row["variants"].append(variant)
    for variant, binary in zip(row["variants"], binaries):
        try:
            per_q_head = binary.repeat_interleave(shape["Hq"] // binary.shape[1], dim=1).contiguous()
            flex = flex_runner(q, k, v, per_q_head, causal=causal, block=bk, compile_=compile_flex)
            flex_out = flex()
            variant.update(flex_ms=bench(flex, device), flex_rel_err=rel_err(flex_out, dense),
                           flex_sparsity=psa_kernels.sparsity(binary, causal=causal, q_len=L, k_len=L, block_q=bq,
                                                              block_k=bk).mean().item())
        except Exception as err:  # noqa: BLE001 - report, keep benchmarking the rest
            variant.update(flex_error=f"{type(err).__name__}: {err}"[:200])
        print(f"{kind:10s} {shape_name:12s} {L:7d} {variant['name']:16s} {variant['sparsity']:6.3f} "
              f"{variant['estimate_ms']:8.2f} {variant['assign_ms']:8.2f} {variant['attend_ms']:8.2f} "
              f"{variant['call_ms']:8.2f} {variant['call_graph_ms']:8.2f} {row['dense_ms']:8.2f} "
              f"{variant.get('flex_ms', float('nan')):8.2f} {variant['psa_binary_ms']:8.2f} {variant['rel_err']:9.2e} "
              f"{variant.get('flex_rel_err', float('nan')):9.2e}", flush=True)
    return row


def hook_overhead(lengths, *, device, dtype, seed=0):
    """Below ``min_seq_len`` the ``"psa"`` hook runs dense attention: its time against
    transformers' own SDPA hook on the same call (causal 28/4 heads, D=128)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from psa_vlm.attention import psa_attention_forward

    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module.layer_idx = True, 7, 0
    rows = []
    for L in lengths:
        q, k, v = make_inputs("random", L, SHAPES["text-causal"], seed=seed, device=device, dtype=dtype)
        scale = q.shape[-1] ** -0.5
        sdpa = bench(lambda: sdpa_attention_forward(module, q, k, v, None, scaling=scale, is_causal=True), device)
        psa = bench(lambda: psa_attention_forward(module, q, k, v, None, scaling=scale), device)
        rows.append(dict(L=L, sdpa_hook_ms=sdpa, psa_hook_dense_fallback_ms=psa, ratio=psa / sdpa))
        print(f"hook below min_seq_len  L={L:6d}  sdpa hook {sdpa:7.3f} ms  psa hook (dense fallback) {psa:7.3f} ms  "
              f"ratio {psa / sdpa:.3f}", flush=True)
    return rows


def plot(rows, path):
    from psa_vlm.viz import plot_attention_benchmark

    plot_attention_benchmark(rows).savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,8192,16384,32768,65536,131072")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--kinds", default="random,video-like")
    parser.add_argument("--presets", default="video_mme,fast")
    parser.add_argument("--policies", default="quantile",
                        help="level assignments at the fixed sparsities: quantile (fixed fractions), budget "
                        "(the budget-aware policy); comma-separated")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any device (checks the script)")
    parser.add_argument("--hook-overhead", default="",
                        help="comma-separated lengths at which to time the psa hook's dense fallback (below "
                             "min_seq_len) against transformers' sdpa hook, e.g. 4096,16384")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.smoke:
        lengths = [384]
        for s in SHAPES.values():
            s.update(Hq=2 * (s["Hq"] // s["Hkv"] if s["Hq"] != s["Hkv"] else 1), Hkv=2)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print(f"{'inputs':10s} {'shape':12s} {'L':>7s} {'variant':16s} {'sparse':>6s} {'est ms':>8s} {'assign':>8s} "
          f"{'attend':>8s} {'call':>8s} {'graph':>8s} {'dense':>8s} {'flex':>8s} {'psa-bin':>8s} {'psa err':>9s} "
          f"{'flex err':>9s}")
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(device=str(device), torch=torch.__version__, rows=rows, command=" ".join(["benchmarks/attention.py",
                  *(argv if argv is not None else sys.argv[1:])]),
                  gpu=torch.cuda.get_device_name() if device.type == "cuda" else None,
                  # The kernel the op picks for the text shape (bf16, D=128, 128-token blocks).
                  attention_kernel=psa_kernels.attention_kernel(torch.empty(1, 1, 1, 128, dtype=dtype,
                                                                            device=device)))
    print(f"attention kernel (bf16, D=128): {report['attention_kernel']}")
    start = time.time()
    if args.hook_overhead:
        report["hook_overhead"] = hook_overhead([int(x) for x in args.hook_overhead.split(",")], device=device,
                                                dtype=dtype)
    for shape in (args.shapes.split(",") if args.shapes else []):
        for L in lengths:
            for kind in args.kinds.split(","):
                try:
                    rows.append(run_case(kind, shape, L, args.presets.split(","), device=device, dtype=dtype,
                                         compile_flex=device.type == "cuda", policies=args.policies.split(",")))
                except torch.cuda.OutOfMemoryError:
                    print(f"{kind} {shape} {L}: out of memory, skipped")
                    torch.cuda.empty_cache()
                # Written after every case: a run cut short keeps what it measured.
                (out / "attention.json").write_text(json.dumps(report, indent=1))
                print(f"  ({time.time() - start:.0f} s)", flush=True)
    (out / "attention.json").write_text(json.dumps(report, indent=1))
    plot(rows, out / "attention.png")
    print(f"wrote {out / 'attention.json'} and {out / 'attention.png'}")
    return report


if __name__ == "__main__":
    main()
