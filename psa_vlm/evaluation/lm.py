"""``psa-qwen2.5-vl``: a Qwen-VL model (Qwen2.5-VL, Qwen2-VL, Qwen3-VL, Qwen3-VL-MoE) with a chosen
attention as an lm-eval model.

Greedy generation for multiple-choice video QA. Each request carries its video as
``{"type": "video", "video": path, "fps"/"nframes", "max_pixels", ...}`` (the task decides how
frames are sampled and sized, before decoding); the frames go through
:func:`psa_vlm.video.load_video`, the processor gets them with their metadata. Per sample the
model records the prefill time (to the first token), the visual tokens and the mean PSA
sparsity; with ``predictions=PATH`` every answer is appended to a JSONL file as it is made
and a rerun answers from it, so a killed run resumes where it stopped.

Model arguments (``--model_args`` in lm-eval): ``pretrained`` (folder, hub id, a shape of
:data:`psa_vlm.models.SHAPES` or ``tiny``), ``attn`` (``psa``, ``sdpa``, ``eager``, ...),
``preset`` and ``overrides`` (``"field=value;field=value"``) for ``psa``, ``device``,
``dtype`` (``auto``, ``bf16``, ``fp16``, ``fp32``), ``device_map`` (``auto`` for a model larger
than one GPU), ``batch_size``, ``max_new_tokens`` (default: the task's ``max_gen_toks``),
``predictions``, ``system_prompt`` (default: the chat template's own). Under ``accelerate launch`` or ``torchrun`` each process takes its share of the
requests (``torch.distributed``: NCCL on GPUs, gloo on CPUs) and writes its own
``<predictions>.rank<r>.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from ..config import DEFAULT_PRESET, parse_overrides
from ..models import TINY_MODEL_OVERRIDES, default_device, load_model, resolve_dtype
from ..timing import FirstTokenClock

logger = logging.getLogger("psa_vlm.eval")

MODEL_NAME = "psa-qwen2.5-vl"


def request_key(task: str, doc_id, context: str) -> str:
    """Identifies a request across runs: the task, the document and its prompt."""
    return f"{task}|{doc_id}|{hashlib.sha1(context.encode()).hexdigest()[:12]}"


@register_model(MODEL_NAME)
class PSAQwenVL(LM):
    MULTIMODAL = True

    def __init__(self, pretrained: str = "tiny", attn: str = "psa", preset=DEFAULT_PRESET, overrides=None,
                 device: str | None = None, dtype: str = "auto", device_map: str | None = None, batch_size=1,
                 max_new_tokens: int | None = None, predictions: str | None = None, model=None, processor=None,
                 system_prompt: str | None = None, **unused):
        super().__init__()
        if unused:
            logger.warning("psa-qwen2.5-vl ignores unknown model arguments %s", sorted(unused))
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.distributed:  # accelerate launch / torchrun: lm-eval shards the requests over the ranks
            import torch.distributed as dist

            cuda = torch.cuda.is_available() and device != "cpu"
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if cuda else "gloo")
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()
            if cuda:
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
                torch.cuda.set_device(device)
        self.device_name = default_device(device)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.max_new_tokens = None if max_new_tokens is None else int(max_new_tokens)
        torch_dtype = resolve_dtype(dtype)
        if model is None:
            model, processor = load_model(str(pretrained), device=self.device_name, dtype=torch_dtype,
                                          device_map=device_map)
        elif processor is None:
            raise ValueError("a model given as an object needs its processor too")
        self.model, self.processor, self.pretrained = model, processor, str(pretrained)
        self.attn = attn
        self.system_prompt = system_prompt
        self.records: list[dict] = []  # what this process answered (not the resumed ones), in order
        self.preset = preset
        self.preset_name = getattr(preset, "name", str(preset))  # a PSAConfig or a preset name/path
        self.overrides = parse_overrides(overrides)
        if str(pretrained) == "tiny":  # blocks small enough for the tiny model's few hundred tokens

            self.overrides = {**TINY_MODEL_OVERRIDES, **self.overrides}
        self._set_attention()
        self.predictions = None
        self.done: dict[str, dict] = {}
        if predictions:
            path = Path(predictions)
            if self.world_size > 1:
                path = path.with_name(f"{path.stem}.rank{self.rank}{path.suffix}")
            self.predictions = path
            _drop_torn_lines(path)
            self.done = read_predictions(path)

    # -- lm-eval interface ------------------------------------------------------------------

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """lm-eval's ``--device`` / ``--batch_size`` fill in what ``--model_args`` leaves open
        (lm-eval's default passes both and fails on a repeated keyword)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        extra.pop("max_batch_size", None)
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        from lm_eval import utils

        return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string), additional_config)

    @property
    def tokenizer_name(self) -> str:
        return f"{self.pretrained}:{self.attn}"

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            "psa-qwen2.5-vl only generates (output_type: generate_until); loglikelihood scoring of video "
            "questions is not supported. Use the eval_tasks/ tasks, which score the generated letter."
        )

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("psa-qwen2.5-vl only generates (output_type: generate_until); no rolling loglikelihood")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        answers: list[str | None] = [None] * len(requests)
        todo = []
        for i, request in enumerate(requests):
            key = request_key(request.task_name, request.doc_id, request.args[0])
            if key in self.done:
                answers[i] = self.done[key]["response"]
            else:
                todo.append((i, key, request))
        if len(todo) < len(requests):
            logger.info("resuming: %d of %d answers read from %s", len(requests) - len(todo), len(requests),
                        self.predictions)
        bar = tqdm(total=len(todo), desc=f"{self.attn} answers", disable=disable_tqdm or self.rank != 0)
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            for (i, key, request), record in zip(batch, self._answer([r for _, _, r in batch])):
                answers[i] = record["response"]
                self.records.append(record)
                self._save(key, request, record)
            bar.update(len(batch))
        bar.close()
        return answers

    # -- distributed ------------------------------------------------------------------------

    def all_gather(self, tensor):
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        tensor = tensor.to(self.device_name) if dist.get_backend() == "nccl" else tensor.cpu()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst=0):
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self):
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    # -- work -------------------------------------------------------------------------------

    def _set_attention(self):
        from ..runtime import use_attention

        if self.attn == "psa":
            use_attention(self.model, self.preset, **self.overrides)
        else:
            use_attention(self.model, None, dense=self.attn)

    def _answer(self, requests) -> list[dict]:
        """Generate for a batch; a sample whose video cannot be read gets an empty answer and its error."""
        import psa_vlm
        from ..video import MediaError, load_video, patch_factor, video_inputs

        records, loaded = [], []
        for request in requests:
            context, gen_kwargs = request.args[0], request.args[1]
            visuals = request.args[2].get("visual") if len(request.args) > 2 else None
            video = _one_video(visuals)
            options = {k: v for k, v in video.items() if k not in ("type", "video")}
            try:
                loaded.append((context, gen_kwargs, load_video(video["video"], factor=patch_factor(self.processor),
                                                                **options)))
                records.append(None)
            except (MediaError, FileNotFoundError) as err:
                logger.warning("%s/%s: %s (answer left empty, counted wrong)", request.task_name, request.doc_id, err)
                records.append(dict(response="", error=str(err)))
        if not loaded:
            return records
        inputs = video_inputs(self.processor, [v for _, _, v in loaded], [c for c, _, _ in loaded],
                              system_prompt=self.system_prompt).to(self.model.device)
        if "pixel_values_videos" in inputs:
            inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(self.model.dtype)
        gen_kwargs = loaded[0][1]
        max_new = self.max_new_tokens or int(gen_kwargs.get("max_gen_toks", 16))
        until = [u for u in (gen_kwargs.get("until") or []) if u]
        cuda = self.model.device.type == "cuda"
        clock = FirstTokenClock(cuda)
        if self.attn == "psa":
            psa_vlm.reset_stats(self.model)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new, do_sample=False, logits_processor=[clock],
                                      pad_token_id=self.processor.tokenizer.pad_token_id)
        sparsity = psa_vlm.mean_sparsity(self.model) if self.attn == "psa" else None
        not_run = psa_vlm.not_run_reason(self.model) if self.attn == "psa" else None
        prefill_ms = ((clock.at or time.perf_counter()) - start) * 1e3
        new = out[:, inputs["input_ids"].shape[1]:]
        texts = self.processor.batch_decode(new, skip_special_tokens=True)
        visual = (inputs["mm_token_type_ids"] != 0).sum(1).tolist()
        made = iter(zip(texts, visual))
        for j, record in enumerate(records):
            if record is None:
                text, n_visual = next(made)
                for stop in until:
                    text = text.split(stop)[0]
                records[j] = dict(response=text, prefill_ms=prefill_ms, batch=len(loaded), visual_tokens=int(n_visual),
                                  tokens=int(inputs["input_ids"].shape[1]), sparsity=sparsity)
                if not_run is not None:  # why the sparsity is missing, for the report
                    records[j]["psa_not_run"] = not_run
        return records

    def _save(self, key: str, request, record: dict) -> None:
        record = dict(key=key, task=request.task_name, doc_id=request.doc_id, attn=self.attn,
                      preset=self.preset_name if self.attn == "psa" else None, **record)
        self.done[key] = record
        if self.predictions is None:
            return
        self.predictions.parent.mkdir(parents=True, exist_ok=True)
        with self.predictions.open("a") as f:  # one line per answer, on disk before the next one starts
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _one_video(visuals) -> dict:
    if not visuals:
        raise ValueError("a psa-qwen2.5-vl request needs a video: the task's doc_to_image must give one")
    visuals = visuals if isinstance(visuals, list) else [visuals]
    if len(visuals) != 1 or not isinstance(visuals[0], dict) or "video" not in visuals[0]:
        raise ValueError(f"expected one {{'type': 'video', 'video': path, ...}} per request, got {visuals!r:.200}")
    return visuals[0]


def _drop_torn_lines(path: Path) -> None:
    """Rewrite this process's predictions file without the lines a kill tore mid-write (not JSON),
    so the file holds whole records only and the next answer starts a line of its own. The new
    file is written beside the old one and replaces it in one step: a kill during the rewrite
    leaves the old file whole."""
    if not path.is_file():
        return
    data = path.read_bytes()
    lines = data.splitlines()
    kept = [line for line in lines if _is_record(line)]
    if len(kept) == len(lines) and (not data or data.endswith(b"\n")):
        return  # nothing torn
    logger.warning("%s: dropping %d torn line(s) (a run killed while writing)", path, len(lines) - len(kept))
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"".join(line + b"\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, path.stat().st_mode & 0o777)  # mkstemp's file is private; keep the old permissions
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _is_record(line: bytes) -> bool:
    """A whole predictions record: a JSON object with its key."""
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
        return False
    return isinstance(record, dict) and "key" in record


def read_predictions(path) -> dict[str, dict]:
    """``{key: record}`` from a predictions JSONL (and its per-rank siblings); a torn last line is skipped."""
    path = Path(path)
    files = [path, *sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))] if path.parent.exists() else []
    out = {}
    for file in files:
        if not file.is_file():
            continue
        for line in file.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s: skipping a torn line (a run killed while writing)", file)
                continue
            out[record["key"]] = record
    return out
