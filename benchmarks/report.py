"""Markdown tables from benchmarks/attention.py results (used for docs/performance.md).

    python benchmarks/report.py benchmarks/results/attention_text_h200.json [--kind video-like]

Prints the per-variant table (estimate, assign, attend, the whole call, dense SDPA,
FlexAttention at the same FLOPs and the same binary map through the PSA kernel, errors), the
break-even table (whole PSA call / dense per length and variant: where PSA starts to pay), the
fixed costs (the mask generation's GPU time against dense's, the host's addition to a call) and
the error summary.
"""

from __future__ import annotations

import argparse
import json

NAN = float("nan")


def table(report, kind):
    lines = ["| L | variant | sparsity | estimate ms | assign ms | attend ms | whole call ms | dense SDPA ms | "
             "call / dense | call in a CUDA graph / dense | (estimate + assign) / dense | Flex ms (same FLOPs) | attend / Flex | "
             "PSA kernel on Flex's map ms | PSA rel. err | Flex rel. err |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        if r["kind"] != kind:
            continue
        dense = r["dense_ms"]
        for v in r["variants"]:
            call = v.get("call_ms", v["total_ms"])
            flex = v.get("flex_ms", NAN)
            lines.append(
                f"| {r['L']} | {v['name']} | {v['sparsity']:.3f} | {v['estimate_ms']:.2f} | {v['assign_ms']:.2f} | "
                f"{v['attend_ms']:.2f} | {call:.2f} | {dense:.2f} | {call / dense:.2f} | "
                f"{v.get('call_graph_ms', NAN) / r.get('dense_graph_ms', dense):.2f} | "
                f"{(v['estimate_ms'] + v['assign_ms']) / dense:.3f} | {flex:.2f} | {v['attend_ms'] / flex:.2f} | "
                f"{v.get('psa_binary_ms', NAN):.2f} | {v['rel_err']:.3f} | {v.get('flex_rel_err', NAN):.3f} |")
    return "\n".join(lines)


def break_even(report, kind):
    """Whole PSA call / dense SDPA per (variant, length); below 1 PSA pays."""
    rows = sorted((r for r in report["rows"] if r["kind"] == kind), key=lambda r: r["L"])
    if not rows:
        return ""
    names = [v["name"] for v in rows[0]["variants"]]
    lines = ["| variant | " + " | ".join(f"{r['L']}" for r in rows) + " | pays from |",
             "|---|" + "---:|" * (len(rows) + 1)]
    for name in names:
        ratios = []
        for r in rows:
            v = next((v for v in r["variants"] if v["name"] == name), None)
            ratios.append(NAN if v is None else v.get("call_ms", v["total_ms"]) / r["dense_ms"])
        first = next((r["L"] for r, x in zip(rows, ratios) if x < 1 and all(y < 1 for y in ratios[rows.index(r):])),
                     None)
        lines.append(f"| {name} | " + " | ".join(f"{x:.2f}" for x in ratios) + f" | {first or '-'} |")
    return "\n".join(lines)


def fixed_costs(report, kind):
    """GPU time of the mask generation (estimate + assignment, replayed from a CUDA graph) against
    dense SDPA's (replayed the same way), and what the host adds to a call timed alone (the whole
    call's time minus its replay's)."""
    lines = ["| L | variant | mask generation in a graph ms | dense in a graph ms | mask / dense (GPU time) | "
             "whole call ms | call in a graph ms | host's addition ms |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        if r["kind"] != kind:
            continue
        dense = r.get("dense_graph_ms", r["dense_ms"])
        for v in r["variants"]:
            if "mask_graph_ms" not in v:
                continue
            call, graph = v.get("call_ms", NAN), v.get("call_graph_ms", NAN)
            lines.append(f"| {r['L']} | {v['name']} | {v['mask_graph_ms']:.3f} | {dense:.2f} | "
                         f"{v['mask_graph_ms'] / dense:.3f} | {call:.3f} | {graph:.3f} | {call - graph:+.3f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def error_summary(report):
    pairs = [(v["rel_err"], v["flex_rel_err"]) for r in report["rows"] for v in r["variants"] if "flex_rel_err" in v]
    lower = sum(p < f for p, f in pairs)
    return f"PSA error below FlexAttention's at the same FLOPs in {lower} of {len(pairs)} runs"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results")
    parser.add_argument("--kind", default="video-like")
    args = parser.parse_args()
    report = json.load(open(args.results))
    print(table(report, args.kind))
    print()
    print(break_even(report, args.kind))
    print()
    costs = fixed_costs(report, args.kind)
    if costs:
        print(costs)
        print()
    print(error_summary(report))


if __name__ == "__main__":
    main()
