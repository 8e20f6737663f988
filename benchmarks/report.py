"""Markdown tables from benchmarks/attention.py results (used for docs/performance.md).

    python benchmarks/report.py benchmarks/results/attention_text_h100.json [--kind video-like]
"""

from __future__ import annotations

import argparse
import json


def table(report, kind):
    lines = ["| L | variant | sparsity | estimate ms | assign ms | attend ms | PSA total ms | dense SDPA ms | "
             "total / dense | FlexAttention ms (same FLOPs) | PSA rel. err | Flex rel. err |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        if r["kind"] != kind:
            continue
        for v in r["variants"]:
            lines.append(
                f"| {r['L']} | {v['name']} | {v['sparsity']:.3f} | {v['estimate_ms']:.2f} | {v['assign_ms']:.2f} | "
                f"{v['attend_ms']:.2f} | {v['total_ms']:.2f} | {r['dense_ms']:.2f} | "
                f"{v['total_ms'] / r['dense_ms']:.2f} | {v.get('flex_ms', float('nan')):.2f} | "
                f"{v['rel_err']:.3f} | {v.get('flex_rel_err', float('nan')):.3f} |")
    return "\n".join(lines)


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
    print(error_summary(report))


if __name__ == "__main__":
    main()
