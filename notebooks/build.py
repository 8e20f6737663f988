"""Write the three notebooks from the cells below and execute them in place (outputs saved).

    python notebooks/build.py            # all three, about a minute each on a 2-core CPU
    python notebooks/build.py 02         # one

The notebooks are committed with the outputs of this run, so a reader on GitHub sees the plots;
CI (tests/test_notebooks.py) executes the committed notebooks again from a clean checkout.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent

SETUP = '''\
# Change these two lines to use a real model, e.g. MODEL = "Qwen/Qwen2.5-VL-7B-Instruct" and DEVICE = "cuda".
MODEL = "tiny"   # the offline tiny random Qwen2.5-VL (no download)
DEVICE = "cpu"

import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a notebook without widgets
import matplotlib.pyplot as plt
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

import psa_kernels
import psa_vlm
from psa_vlm import testing, viz
from psa_vlm.models import TINY_MODEL_OVERRIDES

import transformers
transformers.utils.logging.disable_progress_bar()
REPO = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
WORK = Path(tempfile.mkdtemp(prefix="psa-notebook-"))  # generated videos and files go here
torch.manual_seed(0)
path = testing.tiny_model_dir() if MODEL == "tiny" else MODEL
# The tiny model's prompts are a few hundred tokens: small blocks and no minimum length let PSA run.
OVERRIDES = dict(TINY_MODEL_OVERRIDES) if MODEL == "tiny" else {}
MAX_PIXELS = 224 * 224 if MODEL == "tiny" else 360 * 420  # per frame
MIN_PIXELS = testing.VIDEO_MIN_PIXELS if MODEL == "tiny" else None
dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
'''

QUICKSTART = [
    ("md", """\
# PSA quick start

Pyramid Sparse Attention (PSA) lets each query block read its important key blocks at full
resolution and the others as 2x/4x/8x mean-pooled summaries. This notebook loads Qwen2.5-VL with
`attn_implementation="psa"`, asks a question about a generated video with dense (`sdpa`) and PSA
attention, compares answers, timings and sparsity, and shows how to choose and edit a preset.

It runs offline on a CPU with the tiny random model; set `MODEL` and `DEVICE` in the first cell
for a real checkpoint (the tiny model's answers are noise: its weights are random)."""),
    ("code", SETUP),
    ("md", "## Install check\nThe package, its kernels (Triton on CUDA, block-by-block PyTorch SDPA elsewhere) and the presets."),
    ("code", '''\
print("torch", torch.__version__, "| CUDA:", torch.cuda.is_available())
print("Triton kernels on", DEVICE, ":", psa_kernels.kernels_available(DEVICE))
from psa_vlm.config import available_presets, load_preset
for name in available_presets():
    print(f"  {name:13s} {load_preset(name).description}")
'''),
    ("md", "## Load the model with `attn_implementation=\"psa\"`"),
    ("code", '''\
model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, attn_implementation="psa", dtype=dtype).to(DEVICE).eval()
processor = AutoProcessor.from_pretrained(path)
psa_vlm.configure(model, "video_mme", **OVERRIDES)   # preset + overrides; lets PSA see where the text is
print(type(model).__name__, "| text layers:", model.config.text_config.num_hidden_layers,
      "| heads:", model.config.text_config.num_attention_heads, "/", model.config.text_config.num_key_value_heads)
'''),
    ("md", "## A generated video\nMoving discs and squares over a drifting texture (`psa_vlm.testing.make_video`)."),
    ("code", '''\
video = testing.make_video(WORK / "quickstart_clip.mp4", frames=32, width=224, height=224, fps=4.0, seed=1)
from psa_vlm.video import load_video
clip = load_video(video, fps=2.0, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
fig, axes = plt.subplots(1, 6, figsize=(13, 2.4))
for ax, i in zip(axes, range(0, len(clip.frames), max(1, len(clip.frames) // 6))):
    ax.imshow(clip.frames[i].permute(1, 2, 0).byte().numpy()); ax.set_title(f"frame {i}"); ax.axis("off")
fig.suptitle(f"{len(clip.frames)} frames sampled at {clip.sample_fps:.1f} fps, {clip.frames.shape[-1]}x{clip.frames.shape[-2]} pixels")
plt.show()
'''),
    ("md", "## Ask with dense and PSA attention"),
    ("code", '''\
from psa_vlm.video import video_inputs
question = "What colour is the moving square?"
inputs = video_inputs(processor, clip, question).to(DEVICE)
results = {}
for attn in ("sdpa", "psa"):
    model.set_attn_implementation(attn)
    if attn == "psa":
        psa_vlm.configure(model, "video_mme", **OVERRIDES)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    seconds = time.perf_counter() - start
    new = out[0, inputs["input_ids"].shape[1]:]
    results[attn] = dict(tokens=new, answer=processor.decode(new, skip_special_tokens=True), seconds=seconds,
                         sparsity=psa_vlm.mean_sparsity(model) if attn == "psa" else None)
n_visual = int((inputs["mm_token_type_ids"] != 0).sum())
print(f"prompt: {inputs['input_ids'].shape[1]} tokens ({n_visual} visual)\\n")
print(f"{'attention':9s} {'seconds':>8s} {'sparsity':>9s}  answer")
for attn, r in results.items():
    sp = "-" if r["sparsity"] is None else f"{r['sparsity']:.3f}"
    print(f"{attn:9s} {r['seconds']:8.2f} {sp:>9s}  {r['answer']!r}")
same = (results["sdpa"]["tokens"] == results["psa"]["tokens"]).float().mean().item()
print(f"\\ngenerated tokens identical: {same:.0%}")
'''),
    ("md", """\
On a CPU the PSA path runs block by block through PyTorch SDPA, so it is not faster here; on a GPU the Triton
kernels make long prefills faster (`docs/performance.md`). Layers shorter than the preset's
`min_seq_len` run dense attention, decode steps too; `psa_vlm.stats(model)` says which and why."""),
    ("code", '''\
for s in [s for s in psa_vlm.stats(model) if s.tower == "text"][:2] + [s for s in psa_vlm.stats(model) if s.tower == "vision"][:1]:
    print(s.tower, s.layer, "| PSA calls:", s.psa_calls, "| sparsity:", None if s.sparsity is None else round(s.sparsity, 3),
          "| dense calls:", dict(s.dense_calls))
'''),
    ("md", """\
## Choose and edit a preset
A preset is a `PSAConfig`: the level thresholds (energy or quantile mode), the similarity cap, the
importance estimator, block sizes, and where PSA runs. Edit fields with `replace` (validated), or
write a YAML file and pass its path."""),
    ("code", '''\
preset = psa_vlm.load_preset("video_mme")
print({k: v for k, v in preset.to_dict().items() if k in ("mode", "levels", "thresholds", "similarity", "stride", "min_seq_len")})
sparser = preset.replace(thresholds=[0.5, 0.6, 0.7, 0.8], **OVERRIDES)
(WORK / "my_preset.yaml").write_text("mode: quantile\\nthresholds: [0.1, 0.2, 0.3, 0.5]\\nsimilarity: null\\n"
                                  + "".join(f"{k}: {v}\\n" for k, v in OVERRIDES.items()))
for config in (sparser, psa_vlm.load_preset(WORK / "my_preset.yaml")):
    psa_vlm.configure(model, config)
    with torch.no_grad():
        model(**inputs)
    print(f"{config.name:12s} mode={config.mode:8s} thresholds={list(config.thresholds)} -> sparsity {psa_vlm.mean_sparsity(model):.3f}")
try:
    preset.replace(thresholds=[0.9, 0.1, 0.2, 0.3])
except ValueError as err:
    print("rejected:", err)
'''),
]

EXPLORER = [
    ("md", """\
# Mask explorer: where each query block looks, and how sharply

For one forward pass: the level map of a chosen layer and head (levels 1/2/4/8 and skipped),
sparsity per layer and head, the share of pairs at each level, coverage against binary
block-sparse attention of the same FLOPs (the paper's Figure 1 comparison), and the effect of the
similarity cap. The plotting functions are in `psa_vlm.viz`; the baselines in `psa_vlm.compare`."""),
    ("code", SETUP),
    ("code", '''\
model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, attn_implementation="psa", dtype=dtype).to(DEVICE).eval()
processor = AutoProcessor.from_pretrained(path)
psa_vlm.configure(model, "video_mme", record_level_maps=True, **OVERRIDES)
video = testing.make_video(WORK / "explorer_clip.mp4", frames=48, width=224, height=224, fps=4.0, seed=2)
from psa_vlm.video import video_inputs
inputs = video_inputs(processor, video, "Where does the blue disc go?", fps=2.0, min_pixels=MIN_PIXELS,
                               max_pixels=MAX_PIXELS).to(DEVICE)
with torch.no_grad():
    model(**inputs)
maps = psa_vlm.level_maps(model)
print(len(maps), "layers recorded; prompt of", inputs["input_ids"].shape[1], "tokens")
'''),
    ("md", "## One layer's level map\nQuery blocks down, key blocks across; red ticks mark blocks holding text (the question and the chat template), the rest is video."),
    ("code", '''\
LAYER, HEAD = 1, 0
rec = maps[("text", LAYER)]
bq, bk = rec["block_q"], rec["block_k"]
text = (inputs["mm_token_type_ids"][0] == 0).cpu()
L = text.shape[0]
text_rows = [bool(text[i * bq:(i + 1) * bq].any()) for i in range((L + bq - 1) // bq)]
text_cols = [bool(text[j * bk:(j + 1) * bk].any()) for j in range((L + bk - 1) // bk)]
fig = viz.plot_level_map(rec["level_map"][0, HEAD], block_q=bq, block_k=bk, text_rows=text_rows, text_cols=text_cols,
                         title=f"text layer {LAYER}, head {HEAD}: PSA level map (causal)")
plt.show()
'''),
    ("md", "## Sparsity per layer and head, and the share of pairs at each level"),
    ("code", '''\
text_stats = [s for s in psa_vlm.stats(model) if s.tower == "text" and s.head_sparsity]
fig = viz.plot_sparsity([s.head_sparsity for s in text_stats], layer_labels=[s.layer for s in text_stats])
plt.show()
visible = psa_kernels.block_visibility(batch=1, q_len=L, k_len=L, block_q=bq, block_k=bk, causal=True)[0]
shares = {f"layer {s.layer}": viz.level_shares(maps[("text", s.layer)]["level_map"][0], visible) for s in text_stats}
fig = viz.plot_level_shares(shares, title="Resolution of the visible block pairs, per text layer")
plt.show()
'''),
    ("md", """\
## PSA vs binary block-sparse at the same FLOPs
A random tiny model attends almost uniformly, so the comparison uses structured *video-like*
queries and keys (`psa_vlm.compare.video_like`: a smooth field over frames and space plus noise,
256 text tokens at the end), 4,096 tokens, 128-token blocks. The binary mask keeps, per row, the
most important blocks up to PSA's density in that row (`row_density`), all at full resolution;
PSA spends the same FLOPs on more blocks at coarser resolution."""),
    ("code", '''\
from psa_vlm.compare import binary_map_like, row_density, video_like_qkv
L2, B2 = 4096, 128
q, k, v = video_like_qkv(L2, 4, 1, 64, seed=0)
text2 = torch.zeros(1, L2, dtype=torch.bool); text2[:, -256:] = True
config = psa_vlm.load_preset("video_mme").at_sparsity(0.8)
kw = {**config.mask_kwargs(), "block_q": B2, "block_k": B2}
scores = psa_kernels.antidiagonal_importance(q, k, causal=True, block_q=B2, block_k=B2, stride=kw["stride"])
psa_map = psa_kernels.build_level_map(q, k, causal=True, text_mask=text2, scores=scores, **kw)
geometry = dict(causal=True, q_len=L2, k_len=L2, block_q=B2, block_k=B2)
sp = psa_kernels.sparsity(psa_map, **geometry).mean().item()
vis2 = psa_kernels.block_visibility(batch=1, q_len=L2, k_len=L2, block_q=B2, block_k=B2, causal=True)[:, None]
forced = psa_kernels.forced_full_blocks(batch=1, q_len=L2, k_len=L2, block_q=B2, block_k=B2, causal=True, text_mask=text2)[:, None]
binary = binary_map_like(scores, vis2.expand_as(scores), row_density(psa_map, vis2), forced.expand_as(scores))
fig, axes = plt.subplots(1, 2, figsize=(14, 5.2))
viz.plot_level_map(psa_map[0, 0], block_q=B2, block_k=B2, ax=axes[0], title=f"PSA, sparsity {sp:.2f}")
viz.plot_level_map(binary[0, 0], block_q=B2, block_k=B2, ax=axes[1],
                   title=f"binary block-sparse, sparsity {psa_kernels.sparsity(binary, **geometry).mean().item():.2f}")
plt.show()
dense = psa_kernels.dense_attention(q, k, v, causal=True)
err = lambda out: ((out - dense).norm() / dense.norm()).item()
psa_out = psa_kernels.psa_attention(q, k, v, psa_map, causal=True, block_q=B2, block_k=B2)
bin_out = psa_kernels.psa_attention(q, k, v, binary, causal=True, block_q=B2, block_k=B2)
cov = {name: viz.coverage(m[0, 0], vis2[0, 0]) for name, m in (("PSA", psa_map), ("binary", binary))}
print(f"coverage (visible pairs read at any level): PSA {cov['PSA']:.2f}, binary {cov['binary']:.2f}")
print(f"relative error vs dense: PSA {err(psa_out):.3f}, binary {err(bin_out):.3f}")
fig = viz.plot_level_shares({"PSA": viz.level_shares(psa_map[0, 0], vis2[0, 0]),
                             "binary": viz.level_shares(binary[0, 0], vis2[0, 0])}, title="Same FLOPs, different reach")
plt.show()
'''),
    ("md", """\
## The similarity cap
A key block may be pooled by `p` only if its neighbouring keys are similar enough (mean cosine
similarity of token pairs above the threshold for that `p`): pooling dissimilar keys would blur
them. With the cap, blocks whose keys vary move to finer levels; without it, the energy
thresholds alone decide."""),
    ("code", '''\
# The video_mme cap with thresholds that also use level 8 (video_mme's own 0.9/0.9 never does).
energy = psa_vlm.load_preset("video_mme").replace(thresholds=[0.5, 0.6, 0.7, 0.8])
kw = {**energy.mask_kwargs(), "block_q": B2, "block_k": B2}
with_cap = psa_kernels.build_level_map(q, k, causal=True, text_mask=text2, scores=scores, **kw)
without = psa_kernels.build_level_map(q, k, causal=True, text_mask=text2, scores=scores, **{**kw, "similarity": None})
caps = psa_kernels.similarity_cap(k, block_k=B2, thresholds=energy.similarity)
values, counts = caps.flatten().unique(return_counts=True)
print("largest pooling each key block allows:", {f"p<={int(v)}": int(c) for v, c in zip(values, counts)}, "(blocks)")
fig = viz.plot_level_shares({"with cap": viz.level_shares(with_cap[0, 0], vis2[0, 0]),
                             "without cap": viz.level_shares(without[0, 0], vis2[0, 0])},
                            title="Energy 0.5/0.6/0.7/0.8, with and without the similarity cap")
plt.show()
for name, m in (("with cap", with_cap), ("without cap", without)):
    out = psa_kernels.psa_attention(q, k, v, m, causal=True, block_q=B2, block_k=B2)
    print(f"{name:12s} sparsity {psa_kernels.sparsity(m, **geometry).mean().item():.3f}  error {err(out):.3f}")
'''),
]

SPEED = [
    ("md", """\
# Speed and quality

Reads the H100 results in `benchmarks/results/` (written by `benchmarks/attention.py` and
`psa-vlm bench`; `docs/performance.md` has the tables) and plots time vs sequence length and
time/error vs sparsity for dense attention, binary block-sparse attention at the same FLOPs
(FlexAttention) and PSA. Then a small error-vs-budget sweep runs live on this machine's CPU."""),
    ("code", SETUP),
    ("code", '''\
import json
results = REPO / "benchmarks" / "results"
for name in ("attention_text_h100.json", "attention_vision_h100.json"):
    report = json.loads((results / name).read_text())
    print(name, "|", report["device"], "| torch", report["torch"])
    fig = viz.plot_attention_benchmark(report["rows"])
    plt.show()
'''),
    ("md", "## End to end: time to first token of the 7B architecture (H100, random weights)"),
    ("code", '''\
bench = json.loads((results / "bench_7b_h100.json").read_text())
print(f"{'tokens':>8s} {'attention':10s} {'TTFT s':>7s} {'language s':>10s} {'sparsity':>8s} {'TTFT/sdpa':>9s} {'TTFT/psa-off':>12s}")
for row in bench["rows"]:
    for label in bench["attentions"]:
        r = row[label]
        print(f"{row['tokens']:8d} {label:10s} {r['ttft_ms'] / 1e3:7.2f} {r['language_ms'] / 1e3:10.2f} "
              f"{'-' if r['sparsity'] is None else format(r['sparsity'], '.3f'):>8s} "
              f"{r.get('ttft_ratio', float('nan')):9.3f} {r.get('ttft_vs_off', float('nan')):12.3f}")
'''),
    ("md", """\
## Live: error vs compute budget on this machine
Video-like causal inputs (4,096 tokens, 128 of them text, 4 query / 1 key-value heads, 64-token
blocks). For each
sparsity, PSA (quantile levels at that sparsity) and binary block-sparse attention (the same
importance, the same FLOPs, full resolution only); relative error against dense attention."""),
    ("code", '''\
from psa_vlm.compare import binary_map_like, row_density, video_like_qkv
L, B = 4096, 64
q, k, v = video_like_qkv(L, 4, 1, 64, seed=3, text_tokens=128)
text = torch.zeros(1, L, dtype=torch.bool); text[:, -128:] = True
dense = psa_kernels.dense_attention(q, k, v, causal=True)
geometry = dict(causal=True, q_len=L, k_len=L, block_q=B, block_k=B)
visible = psa_kernels.block_visibility(batch=1, q_len=L, k_len=L, block_q=B, block_k=B, causal=True)[:, None]
forced = psa_kernels.forced_full_blocks(batch=1, q_len=L, k_len=L, block_q=B, block_k=B, causal=True, text_mask=text)[:, None]
scores = psa_kernels.antidiagonal_importance(q, k, causal=True, block_q=B, block_k=B, stride=8)
curves = {"PSA": [], "binary block-sparse": []}
start = time.perf_counter()
for target in (0.3, 0.5, 0.65, 0.8, 0.9):
    kw = {**psa_vlm.load_preset("video_mme").at_sparsity(target).mask_kwargs(), "block_q": B, "block_k": B}
    level_map = psa_kernels.build_level_map(q, k, causal=True, text_mask=text, scores=scores, **kw)
    binary = binary_map_like(scores, visible.expand_as(scores), row_density(level_map, visible), forced.expand_as(scores))
    for name, m in (("PSA", level_map), ("binary block-sparse", binary)):
        out = psa_kernels.psa_attention(q, k, v, m, causal=True, block_q=B, block_k=B)
        curves[name].append((psa_kernels.sparsity(m, **geometry).mean().item(), ((out - dense).norm() / dense.norm()).item()))
print(f"sweep: {time.perf_counter() - start:.1f} s on {DEVICE}")
for name, points in curves.items():
    print(name, [(round(s, 2), round(e, 3)) for s, e in points])
fig = viz.plot_error_vs_budget(curves, title=f"Error vs sparsity, video-like causal inputs, {L} tokens (live, {DEVICE})")
plt.show()
'''),
]

NOTEBOOKS = {"01_quickstart.ipynb": QUICKSTART, "02_mask_explorer.ipynb": EXPLORER, "03_speed_quality.ipynb": SPEED}


def build(name: str, cells, *, execute: bool = True) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                for kind, src in cells]
    if execute:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    path = HERE / name
    nbformat.write(nb, path)
    return path


if __name__ == "__main__":
    wanted = sys.argv[1:]
    for name, cells in NOTEBOOKS.items():
        if not wanted or any(name.startswith(w) for w in wanted):
            print("building", build(name, cells))
