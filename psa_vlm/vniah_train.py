"""Train a small Qwen2.5-VL to find needles in long videos (the V-NIAH model).

    python -m psa_vlm.vniah_train --output DIR [--minutes 20] [--device cuda|cpu] [--target 0.95]
        [--kinds colour] [--init CHECKPOINT] [--promote 0.9]

The model shipped in ``checkpoints/vniah`` (``--model vniah``) was trained on two CPU cores in 19
minutes with ``--device cpu --tokens 8192 --max-batch 32 --val-samples 64``; on an H200 the
defaults with ``--target 0.95`` reach 128 frames in about 2.5 minutes (docs/quality.md).

The coverage model ``checkpoints/vniah_coverage`` (``--model vniah-coverage``: ``majority``
questions, whose answer needs every one of five squares spread over the video) starts from the
needle model's weights (``--init``) and moves on at 75% (``--promote 0.75``); its commands are in
its ``training.json`` and docs/quality.md.

The real architecture, small (FIELD_NOTES: text hidden 256, 4 layers, 8/2 heads, M-RoPE
[4, 6, 6]; vision depth 4, hidden 128, 112-pixel windows, full attention in blocks 1 and 3;
about 4.7 M parameters), trained with dense attention on :mod:`psa_vlm.needles` questions
through the processor path. The recipe follows the feasibility run recorded in FIELD_NOTES:

- loss on the answer only: cross-entropy over the four option letters' logits after the prompt,
  plus a small z-loss (log-sum-exp squared) against the rare batches that blow up Adam;
- AdamW (lr 1e-3, betas 0.9/0.95, weight decay 0.05), linear warm-up, gradient clipping at 1,
  bf16 autocast for the training steps (on a GPU, and on a CPU, where it is about 1.3x faster);
- a length curriculum (2 frames up to ``--max-frames``), promoted when the running accuracy at
  the current length passes 90%, with a quarter of each batch's draws replaying shorter lengths,
  and batches of about ``--tokens`` visual tokens (at most ``--max-batch`` videos);
- keep-best: a fixed validation set at the current length is scored every ``--eval-every``
  steps; the best model so far (longest length first, then accuracy) is what gets saved, in
  fp16 with its tokenizer and processor, and the learning rate decays over the last quarter of
  the time budget;
- ``--target``: stop as soon as a validation at ``--max-frames`` reaches this accuracy.

The vision tower runs under ``"psa"`` with PSA off (every call dense), which batches its
windows (:mod:`psa_vlm.windows`): training steps several times faster than ``"sdpa"``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import deque
from pathlib import Path

import torch

from .needles import KINDS, BatchRenderer, default_workers, make_sample, sample_inputs

#: The model of FIELD_NOTES' feasibility run.
MODEL_SHAPE = dict(
    text_config=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=32, max_position_embeddings=32768,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                     initializer_range=0.02),
    vision_config=dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, window_size=112,
                       fullatt_block_indexes=[1, 3], out_hidden_size=256, initializer_range=0.02),
)


def build_model(seed: int = 0):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from .tiny import tiny_model_config

    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(tiny_model_config(**MODEL_SHAPE))


def load_initial(path):
    """The weights of a trained checkpoint folder, in fp32, to start a run from (``--init``)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"--init {path}: no config.json there; pass a checkpoint folder (e.g. one this "
                                "trainer wrote)")
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)


def letter_loss(logits: torch.Tensor, letter_ids: torch.Tensor, answers: torch.Tensor, z_weight: float = 1e-4):
    """(loss, correct count): cross-entropy over the option letters' logits, plus z-loss."""
    scores = logits[:, letter_ids].float()
    loss = torch.nn.functional.cross_entropy(scores, answers)
    z = torch.logsumexp(logits.float(), dim=-1)
    return loss + z_weight * (z**2).mean(), int((scores.argmax(-1) == answers).sum())


def train(output, *, minutes: float = 20.0, max_frames: int = 128, tokens: int = 32768, size=(224, 224),
          kinds=("colour",), lr: float = 1e-3, warmup: int = 100, eval_every: int = 50, val_samples: int = 128,
          max_batch: int = 64, target: float | None = None, device: str | None = None, seed: int = 0,
          max_steps: int | None = None, workers: int | None = None, init=None, promote: float = 0.9, min_frames: int = 2,
          progress=print) -> dict:
    """Train, keep the best model in ``output``; returns the training record (``training.json``).
    ``workers``: processes rendering batches ahead (None: every core but one on a GPU, none on a
    CPU). With workers the next ``workers`` batches are drawn ahead of the step that trains on
    them, so a promotion reaches the batches a few steps later than without. ``init``: a
    checkpoint folder (e.g. the shipped V-NIAH model) whose weights the run starts from instead
    of random ones (same architecture); ``min_frames``: the curriculum's first length (e.g. to
    go on from a run that stopped part-way). ``promote``: the accuracy (running, then validation)
    that moves the curriculum to the next length."""
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        raise ValueError(f"kinds must be one or more of {KINDS}, got {list(kinds)}")
    if not 0 < promote <= 1:
        raise ValueError(f"promote must be in (0, 1], got {promote}")
    if not any(min_frames <= f <= max_frames for f in (2, 4, 8, 16, 32, 64, 128, 256, 512)):
        raise ValueError(f"no curriculum length between {min_frames} and {max_frames} frames (lengths are powers of 2 "
                         "from 2 to 512)")
    from . import use_attention
    from .variants import PSA_OFF, variant
    from .models import default_device
    from .tiny import build_tiny_processor
    from .vniah import batch_specs
    from .vniah import letter_ids as letters_of

    device = default_device(device)
    cuda = device.startswith("cuda")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    processor = build_tiny_processor(video_pixels=(56 * 56, size[0] * size[1]))
    model = (build_model(seed) if init is None else load_initial(init)).to(device)
    use_attention(model, variant(PSA_OFF).config)  # dense everywhere, vision windows batched
    ids = torch.tensor(letters_of(processor.tokenizer), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    levels = [f for f in (2, 4, 8, 16, 32, 64, 128, 256, 512) if min_frames <= f <= max_frames]
    tokens_per_frame = (size[0] // 28) * (size[1] // 28) / 2
    rng = random.Random(seed)
    workers = default_workers(device) if workers is None else workers
    val: dict[int, list] = {}  # without workers: validation questions, rendered when a length is first reached

    def validation_specs(frames: int) -> list:  # fixed per length, away from the test set's seeds
        return batch_specs(frames, val_samples, size=size, kinds=kinds, batch_size=8, seed=10_000_000 + frames * 1000)

    def validation_batches(frames: int):
        if workers:  # rendered again each time, across the workers: no frames held between validations
            return renderer.map(validation_specs(frames))
        if frames not in val:  # kept as frames (uint8), a quarter of their processed size
            val[frames] = [[make_sample(seed, frames=frames, size=size, kind=kind) for seed, kind in spec[1]]
                           for spec in validation_specs(frames)]
        return (([q.answer for q in questions], sample_inputs(processor, questions)) for questions in val[frames])

    def run(answers, inputs, train_mode: bool):
        inputs = {k: v.to(device) for k, v in inputs.items()}
        answers = torch.tensor(["ABCD".index(a) for a in answers], device=device)
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=train_mode):
            logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        return letter_loss(logits, ids, answers)

    def validate(frames: int) -> float:
        model.eval()
        correct = 0
        with torch.no_grad():
            for answers, inputs in validation_batches(frames):
                correct += run(answers, inputs, False)[1]
        model.train()
        return correct / val_samples

    def draw() -> tuple:
        """The next training batch's spec at the current curriculum level."""
        frames = levels[level] if level == 0 or rng.random() >= 0.25 else levels[rng.randrange(level)]
        batch = min(max_batch, max(1, int(tokens // (frames * tokens_per_frame))))
        return frames, [(rng.randrange(10**9), rng.choice(kinds)) for _ in range(batch)], tuple(size)

    start, step, level, running = time.time(), 0, 0, []
    budget = minutes * 60
    best = dict(level=-1, accuracy=-1.0, step=0)
    history = []
    hardware = torch.cuda.get_device_name() if cuda else f"{device} ({torch.get_num_threads()} threads)"
    settings = dict(minutes=minutes, max_frames=max_frames, tokens=tokens, max_batch=max_batch, size=list(size),
                    lr=lr, warmup=warmup, eval_every=eval_every, val_samples=val_samples, target=target, seed=seed,
                    init=None if init is None else str(init), promote=promote, min_frames=min_frames)

    def log() -> dict:  # after every validation, so an interrupted run keeps its record
        summary = dict(best=best, steps=step, seconds=time.time() - start, levels=levels, history=history,
                       device=hardware, kinds=list(kinds), settings=settings, torch=torch.__version__)
        (output / "training.json").write_text(json.dumps(summary, indent=1))
        return summary

    model.train()
    pending = deque()  # (spec, batch being rendered): with workers, the next batches render ahead
    with BatchRenderer(processor, workers) as renderer:
        while time.time() - start < budget and (max_steps is None or step < max_steps):
            elapsed = (time.time() - start) / budget
            scale = min(1.0, (step + 1) / warmup) * (1.0 if elapsed < 0.75 else 0.5 * (1 + math.cos(math.pi * (elapsed - 0.75) / 0.25)))
            for group in opt.param_groups:
                group["lr"] = lr * scale
            while len(pending) < max(1, workers):
                spec = draw()
                pending.append((spec, renderer.submit(spec)))
            (frames, questions, _), rendering = pending.popleft()
            batch = len(questions)
            loss, correct = run(*rendering.get(), True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if frames == levels[level]:
                running = (running + [correct / batch])[-20:]
            if step % eval_every == 0 or (len(running) == 20 and sum(running) / 20 >= promote):
                accuracy, running = validate(levels[level]), []  # a failed promotion waits 20 more steps
                history.append(dict(step=step, seconds=time.time() - start, frames=levels[level], val_accuracy=accuracy,
                                    loss=float(loss.detach())))
                progress(f"step {step:6d}  {time.time() - start:7.0f} s  frames {levels[level]:4d}  loss {float(loss.detach()):.3f}  "
                         f"val {accuracy:.3f}  lr {lr * scale:.2e}")
                if (level, accuracy) > (best["level"], best["accuracy"]):
                    best = dict(level=level, frames=levels[level], accuracy=accuracy, step=step)
                    save(model, processor, output)
                if target is not None and level == len(levels) - 1 and accuracy >= target:
                    break
                if accuracy >= promote and level + 1 < len(levels):
                    level += 1
                log()
    return log()


def save(model, processor, output: Path) -> None:
    """The model in fp16 (a few MB) with its tokenizer and processor."""
    model.save_pretrained(output, state_dict={k: v.half() for k, v in model.state_dict().items()})
    processor.save_pretrained(output)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m psa_vlm.vniah_train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder for the best checkpoint and training.json")
    parser.add_argument("--minutes", type=float, default=20.0, help="time budget (default: 20)")
    parser.add_argument("--max-frames", type=int, default=128, help="longest curriculum length (default: 128)")
    parser.add_argument("--min-frames", type=int, default=2, help="first curriculum length, a power of 2 (default: 2)")
    parser.add_argument("--tokens", type=int, default=32768, help="visual tokens per batch (default: 32768)")
    parser.add_argument("--target", type=float, help="stop once the validation accuracy at --max-frames reaches "
                        "this (default: train for the whole budget)")
    parser.add_argument("--max-batch", type=int, default=64, help="most videos per batch (default: 64)")
    parser.add_argument("--kinds", default="colour", help=f"needle questions, comma-separated from {KINDS} "
                        "(default: colour)")
    parser.add_argument("--init", help="start from this checkpoint folder's weights (e.g. checkpoints/vniah) instead "
                        "of random ones")
    parser.add_argument("--promote", type=float, default=0.9, help="accuracy at the current length that moves the "
                        "curriculum to the next (default: 0.9)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    parser.add_argument("--warmup", type=int, default=100, help="warm-up steps (default: 100)")
    parser.add_argument("--device", help="default: cuda if available")
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (smoke tests)")
    parser.add_argument("--eval-every", type=int, default=50, help="steps between validations (default: 50)")
    parser.add_argument("--val-samples", type=int, default=128, help="validation questions per length (default: 128)")
    parser.add_argument("--workers", type=int, help="processes rendering batches ahead (default: every core but one "
                        "on a GPU, none on a CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers must be 0 (render in this process) or more, got {args.workers}")
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        parser.error(f"--kinds: unknown {unknown or args.kinds!r}; choose from {', '.join(KINDS)}")
    if not 0 < args.promote <= 1:
        parser.error(f"--promote must be in (0, 1], got {args.promote}")
    if args.min_frames not in (2, 4, 8, 16, 32, 64, 128, 256, 512) or args.min_frames > args.max_frames:
        parser.error(f"--min-frames must be a power of 2 from 2 to 512, at most --max-frames; got {args.min_frames}")
    if args.init is not None and not (Path(args.init) / "config.json").is_file():
        parser.error(f"--init {args.init}: no config.json there; pass a checkpoint folder")
    summary = train(args.output, minutes=args.minutes, max_frames=args.max_frames, tokens=args.tokens,
                    kinds=kinds, max_batch=args.max_batch, init=args.init, promote=args.promote, lr=args.lr, min_frames=args.min_frames,
                    warmup=args.warmup, target=args.target, device=args.device, max_steps=args.max_steps,
                    eval_every=args.eval_every, val_samples=args.val_samples, seed=args.seed,
                    workers=args.workers)
    print(json.dumps(summary["best"]))


if __name__ == "__main__":
    main()
