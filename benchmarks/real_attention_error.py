"""Attention-output error of PSA and binary block-sparse attention on a trained model's own Q/K/V.

The synthetic generators (``benchmarks/attention.py``) say how far each policy's output is from
dense attention on video-like inputs. This script asks the same on real attention: it runs the
shipped V-NIAH model on its test questions, captures every text layer's query, key and value
(after RoPE) and the text positions, and per layer measures the output error of each variant at
equal FLOPs against dense attention on those tensors:

- ``psa@S`` / ``binary@S``: the quantile policy and the binary map spending the same FLOPs;
- ``budget@S`` / ``topk@S``: the budget policy and level-1-only top-k at the same budget.

Errors are relative L2 (``||o - o_dense|| / ||o_dense||``) over three row sets: all rows, the
question's rows (the text after the video) and the last row (where the model reads its answer).
Put beside the V-NIAH accuracies of the same variants (``psa-vlm vniah``), they show whether the
error ranking predicts the answer ranking.

    python benchmarks/real_attention_error.py --frames 128 --questions 8 --dense-text false \\
        --output benchmarks/results/real_error_cpu

Writes ``real_error.json`` and ``real_error.txt`` (and prints the table). CPU or GPU.

With ``--needle-blocks`` it also follows the key blocks that hold the question's needles (the
squares' visual tokens, from the rendered sample) in the last query block, where the model reads
its answer: how each variant reads them (level 1, pooled, skipped, shares over heads and
needles) and where the importance estimate ranks them (the share of the row's visible blocks
scored above each, and whether it is above the row's mean), beside the same ranking by the
block's exact attention mass. Written as ``needle_blocks.txt``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import psa_kernels
from psa_vlm.config import parse_overrides
from psa_vlm.models import load_model
from psa_vlm.needles import make_sample, render_batch
from psa_vlm.variants import at_sparsities, parse_variants
from psa_vlm.vniah import TEST_SEED, recorded_kinds

CAPTURE = "psa_capture"


def register_capture(store: dict):
    """Register ``psa_capture``: SDPA that keeps each causal layer's (q, k, v, scale)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def capture(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if getattr(module, "is_causal", False):
            store[module.layer_idx] = (query.detach(), key.detach(), value.detach(), scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)

    AttentionInterface.register(CAPTURE, capture)
    AttentionMaskInterface.register(CAPTURE, sdpa_mask)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def needle_key_blocks(needles, inputs, frame_side: int, block_k: int = 128) -> list[int]:
    """Key blocks holding a needle's visual tokens: ``needles`` as ``NeedleSample.needles``
    (frame, top, left, side), tokens in temporal-patch then row-major order of the merged grid."""
    visual = torch.nonzero(inputs["mm_token_type_ids"][0] != 0).flatten().tolist()
    _, h, w = (int(x) for x in inputs["video_grid_thw"][0])
    rows, cols = h // 2, w // 2  # Qwen-VL merges 2 x 2 patches into a token
    px = frame_side / rows  # pixels per merged token
    per_patch = rows * cols
    blocks = set()
    for frame, top, left, side in needles:
        for r in range(int(top // px), int((top + side - 1) // px) + 1):
            for c in range(int(left // px), int((left + side - 1) // px) + 1):
                blocks.add(visual[(frame // 2) * per_patch + r * cols + c] // block_k)
    return sorted(blocks)


def level_maps(q, k, scale, text, configs, dense_text: bool) -> dict:
    """``{label: LevelMap}``: each variant's map of one layer, as the ``"psa"`` hook builds it."""
    return {label: psa_kernels.build_level_map(q, k, causal=True, scale=scale, text_mask=text if dense_text else None,
                                               compact=True, **_mask_kwargs(config, dense_text))
            for label, config in configs.items()}


def needle_levels(q, k, scale, blocks, maps: dict) -> dict:
    """Per variant (``maps`` from :func:`level_maps`), the shares of (head, needle block) pairs of the
    last query block read at level 1, pooled and skipped; under ``"rank"`` the importance's view of
    the same pairs, under ``"rank_exact"`` the exact attention's (what the estimate approximates)."""
    out = {}
    for label, level_map in maps.items():
        levels = level_map.to_dense()[0, :, -1, blocks].long()
        out[label] = dict(level1=float((levels == 1).float().mean()), pooled=float((levels > 1).float().mean()),
                          skipped=float((levels == 0).float().mean()))
    imp = psa_kernels.antidiagonal_importance(q, k, causal=True, scale=scale, block_q=128, block_k=128, stride=8)
    row = imp[0, :, -1].double()  # [H, nk]; invisible blocks score 0 and are excluded below
    visible = (row > 0).sum(-1, keepdim=True).clamp(min=1)
    out["rank"] = _needle_rank(row, blocks, visible)
    out["rank_exact"] = _needle_rank(_exact_block_mass(q, k, scale, block=128)[0, :, -1].double(), blocks, visible)
    return out


def _needle_rank(row: torch.Tensor, blocks, visible: torch.Tensor) -> dict:
    """Of ``row [H, nk]``'s ``visible`` blocks: the mean share scored above a needle block, and the
    share of needle blocks above the row's mean."""
    above = ((row[:, None, :] > row[:, blocks, None]).sum(-1) / visible).float()  # [H, needles]
    over_mean = row[:, blocks] > (row.sum(-1, keepdim=True) / visible)
    return dict(share_above=float(above.mean()), above_mean=float(over_mean.float().mean()))


def _exact_block_mass(q, k, scale, block: int) -> torch.Tensor:
    """``[B, Hq, 1, nk]``: the last query block's causal attention probabilities summed per key block."""
    B, Hq, L, D = q.shape
    rows = slice((L - 1) // block * block, L)
    kk = k.repeat_interleave(Hq // k.shape[1], dim=1).float()
    logits = q[:, :, rows].float() @ kk.transpose(-1, -2) * (D**-0.5 if scale is None else scale)
    pos = torch.arange(L, device=q.device)
    logits = logits.masked_fill(pos[None, :] > pos[rows][:, None], float("-inf"))
    p = logits.softmax(-1).sum(-2)  # [B, Hq, L]
    p = torch.nn.functional.pad(p, (0, (-L) % block))
    return p.view(B, Hq, 1, -1, block).sum(-1)


def _mask_kwargs(config, dense_text: bool) -> dict:
    kwargs = config.mask_kwargs()
    if not dense_text:
        kwargs["dense_tail_tokens"] = 0
    return kwargs


def layer_errors(q, k, v, scale, text, maps: dict) -> dict:
    """``{label: dict(all, question, last, sparsity)}`` for one layer's tensors ``[1, H, L, D]`` and
    its variants' maps (:func:`level_maps`)."""
    dense = psa_kernels.dense_attention(q, k, v, causal=True, scale=scale)
    question = torch.nonzero(~text[0]).max().item() + 1  # rows after the last visual token
    out = {}
    for label, level_map in maps.items():
        o = psa_kernels.psa_attention(q, k, v, level_map, causal=True, scale=scale)
        out[label] = dict(all=rel(o, dense), question=rel(o[:, :, question:], dense[:, :, question:]),
                          last=rel(o[:, :, -1:], dense[:, :, -1:]), sparsity=float(level_map.sparsity().mean()))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vniah", help="a trained V-NIAH checkpoint (default: the shipped one)")
    parser.add_argument("--frames", type=int, default=128, help="video length in frames (default: 128)")
    parser.add_argument("--questions", type=int, default=8, help="test questions (default: 8)")
    parser.add_argument("--kind", help="question kind (psa_vlm.needles.KINDS; default: the first of the model's "
                                       "record.json kinds, else colour)")
    parser.add_argument("--sparsity", default="0.5,0.65,0.8,0.9", help="sparsities (default: 0.5,0.65,0.8,0.9)")
    parser.add_argument("--dense-text", default="false", choices=("true", "false"),
                        help="keep text blocks at level 1 (the product setting) or not (default: false, the "
                        "setting where the policies differ in answers)")
    parser.add_argument("--seed", type=int, default=TEST_SEED,
                        help=f"seed of the first question (default: {TEST_SEED}, the V-NIAH test set's; "
                        "another range checks a result on questions it was not chosen on)")
    parser.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                        help="replace a field of every PSA variant (repeatable), e.g. budget_full_share=0")
    parser.add_argument("--needle-blocks", action="store_true",
                        help="also report how each variant reads the needles' key blocks in the last query block "
                        "and where the importance ranks them (needle_blocks.txt)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", help="folder for real_error.json and real_error.txt")
    args = parser.parse_args(argv)

    from psa_vlm.needles import KINDS

    if args.kind is not None and args.kind not in KINDS:
        parser.error(f"--kind must be one of {', '.join(KINDS)}, got {args.kind!r}")
    dense_text = args.dense_text == "true"
    sparsities = [float(s) for s in args.sparsity.split(",")]
    labels = at_sparsities(sparsities)
    overrides = {**parse_overrides(args.override), "min_seq_len": 0, "dense_text": dense_text}
    configs = {label: v.config for label, v in parse_variants(labels, overrides=overrides).items()}
    model, processor = load_model(args.model, device=args.device, dtype=torch.float32)
    kind = args.kind or recorded_kinds(args.model)[0]
    store: dict = {}
    register_capture(store)
    model.set_attn_implementation(CAPTURE)
    sums: dict = {}
    needle_sums: dict = {}
    started = time.perf_counter()
    for i in range(args.questions):
        answers, inputs = render_batch((args.frames, [(args.seed + i, kind)], (224, 224)), processor)
        inputs = {key: value.to(args.device) for key, value in inputs.items()}
        store.clear()
        with torch.no_grad():
            model(**inputs, logits_to_keep=1)
        text = (inputs["mm_token_type_ids"] == 0)
        blocks = None
        if args.needle_blocks:
            sample = make_sample(args.seed + i, frames=args.frames, size=(224, 224), kind=kind)
            blocks = needle_key_blocks(sample.needles, inputs, frame_side=224)
        for layer, (q, k, v, scale) in sorted(store.items()):
            maps = level_maps(q, k, scale, text, configs, dense_text)
            for label, err in layer_errors(q, k, v, scale, text, maps).items():
                acc = sums.setdefault((layer, label), dict(all=0.0, question=0.0, last=0.0, sparsity=0.0))
                for key in acc:
                    acc[key] += err[key] / args.questions
            if blocks is not None:
                for label, shares in needle_levels(q, k, scale, blocks, maps).items():
                    acc = needle_sums.setdefault((layer, label), dict.fromkeys(shares, 0.0))
                    for key in acc:
                        acc[key] += shares[key] / args.questions
        tokens = int(inputs["input_ids"].shape[1])
        print(f"question {i + 1}/{args.questions}: {tokens} tokens, {time.perf_counter() - started:.0f} s", flush=True)
    rows = [dict(layer=layer, variant=label, **values) for (layer, label), values in sorted(sums.items())]
    lines = [f"{'layer':>5s} {'variant':12s} {'sparsity':>8s} {'err all':>8s} {'err question':>12s} {'err last':>8s}"]
    for r in rows:
        lines.append(f"{r['layer']:5d} {r['variant']:12s} {r['sparsity']:8.3f} {r['all']:8.4f} {r['question']:12.4f} "
                     f"{r['last']:8.4f}")
    means = {}
    for label in labels:
        sel = [r for r in rows if r["variant"] == label]
        means[label] = {key: sum(r[key] for r in sel) / len(sel) for key in ("sparsity", "all", "question", "last")}
        lines.append(f"{'mean':>5s} {label:12s} {means[label]['sparsity']:8.3f} {means[label]['all']:8.4f} "
                     f"{means[label]['question']:12.4f} {means[label]['last']:8.4f}")
    table = "\n".join(lines)
    print(table)
    needle_table = _needle_table(needle_sums) if args.needle_blocks else ""
    if needle_table:
        print(needle_table)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        report = dict(model=args.model, frames=args.frames, questions=args.questions, seed=args.seed,
                      overrides=parse_overrides(args.override), tokens=tokens, dense_text=dense_text,
                      device=args.device, rows=rows, means=means, seconds=round(time.perf_counter() - started, 1))
        if needle_table:
            report["needle_blocks"] = [dict(layer=layer, variant=label, **v) for (layer, label), v in
                                       sorted(needle_sums.items())]
            (out / "needle_blocks.txt").write_text(needle_table + "\n")
        (out / "real_error.json").write_text(json.dumps(report, indent=1))
        (out / "real_error.txt").write_text(table + "\n")
    return 0


def _needle_table(needle_sums: dict) -> str:
    """Per layer and variant, the needle blocks' shares read at level 1 / pooled / skipped, and
    the importance's ranking of them (share of visible blocks above, share above the mean)."""
    lines = [f"{'layer':>5s} {'variant':12s} {'level 1':>7s} {'pooled':>7s} {'skipped':>7s}"]
    for (layer, label), v in sorted(needle_sums.items()):
        if label in ("rank", "rank_exact"):
            name = "importance" if label == "rank" else "exact"
            lines.append(f"{layer:5d} {name:12s} blocks above each needle block: {v['share_above']:.3f} "
                         f"of the visible; needle blocks above the row mean: {v['above_mean']:.3f}")
        else:
            lines.append(f"{layer:5d} {label:12s} {v['level1']:7.3f} {v['pooled']:7.3f} {v['skipped']:7.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
