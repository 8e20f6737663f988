"""``psa_qwen2_5_vl``: the project's model for lmms-eval (optional extra ``psa-vlm[lmms]``).

lmms-eval's own ``qwen2_5_vl`` model accepts only ``flash_attention_2``, ``sdpa`` and ``eager``.
This one runs lmms-eval's task definitions (``videomme``, ``mlvu_dev``, ``longvideobench_val_v``,
``egoschema_subset``, ...) with any attention the project names::

    lmms-eval --model psa_qwen2_5_vl \\
        --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,attn=psa,preset=video_mme \\
        --tasks videomme,mlvu_dev,longvideobench_val_v,egoschema_subset --batch_size 1

It is found through the ``lmms_eval.models`` entry point, so installing ``psa-vlm[lmms]`` is all
it takes. Frames and pixels default to lmms-eval's ``qwen2_5_vl``: at most ``max_num_frames``
(32) frames spread over the video (sampled at ``fps``, default 2, then thinned evenly),
``min_pixels`` 200,704 and ``max_pixels`` 1,605,632 per frame, and the system prompt "You are a
helpful assistant.". Unlike lmms-eval's model it gives the processor the frames' timestamps
(``second_per_grid_ts``), as :func:`psa_vlm.video.video_inputs` does everywhere.

The answering is :class:`psa_vlm.evaluation.lm.PSAQwenVL`'s (the ``psa-vlm eval`` model): the
same inputs give the same answers, and each answer's prefill time, visual tokens and PSA
sparsity go to ``predictions=PATH`` (JSONL, resumable) and a summary line per call.

Model arguments: ``pretrained``, ``attn`` (a label of :mod:`psa_vlm.variants`: ``psa``,
``psa:NAME``, ``psa@0.9``, ``sdpa``, ...), ``preset``, ``overrides`` (``"field=value;..."``),
``device``, ``dtype``, ``device_map``, ``batch_size``, ``max_num_frames``, ``fps``,
``min_pixels``, ``max_pixels``, ``system_prompt``, ``max_new_tokens``, ``predictions``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from lmms_eval.api.model import lmms

from ..config import DEFAULT_PRESET, parse_overrides
from ..variants import variant
from .lm import PSAQwenVL
from .lmms_entry import MODEL_NAME, manifest  # noqa: F401 - the entry point's manifest, re-exported

logger = logging.getLogger("psa_vlm.eval")

#: lmms-eval ``qwen2_5_vl``'s defaults.
LMMS_DEFAULTS = dict(max_num_frames=32, fps=2.0, min_pixels=256 * 28 * 28, max_pixels=1605632,
                     system_prompt="You are a helpful assistant.")


@dataclass
class _Request:
    """An lmms-eval request in the form :class:`PSAQwenVL` answers (lm-eval's ``Instance``)."""

    task_name: str
    doc_id: int
    args: tuple


class PSAQwen2_5_VL(lmms):
    is_simple = True

    def __init__(self, pretrained: str = "Qwen/Qwen2.5-VL-7B-Instruct", attn: str = "psa", preset=DEFAULT_PRESET,
                 overrides=None, device: str | None = None, dtype: str = "auto", device_map: str | None = None,
                 batch_size=1, max_num_frames: int = LMMS_DEFAULTS["max_num_frames"],
                 fps: float | None = LMMS_DEFAULTS["fps"], min_pixels: int = LMMS_DEFAULTS["min_pixels"],
                 max_pixels: int = LMMS_DEFAULTS["max_pixels"], system_prompt: str = LMMS_DEFAULTS["system_prompt"],
                 max_new_tokens: int | None = None, predictions: str | None = None, **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"{MODEL_NAME}: unknown model arguments {sorted(unknown)}; see "
                             f"`python -c 'import {__name__} as m; help(m)'`")
        chosen = variant(str(attn), preset=preset, overrides=parse_overrides(overrides))  # a bad label fails here
        self.video_options = dict(fps=None if fps in (None, "None") else float(fps),
                                  max_frames=int(max_num_frames), min_pixels=int(min_pixels),
                                  max_pixels=int(max_pixels))
        self.system_prompt = system_prompt
        self.inner = PSAQwenVL(pretrained=pretrained, attn=chosen.attn, preset=chosen.config or DEFAULT_PRESET,
                               device=device, dtype=dtype, device_map=device_map, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, predictions=predictions, system_prompt=system_prompt)
        self._rank, self._world_size = self.inner.rank, self.inner.world_size
        self.label = chosen.label

    @property
    def model(self):
        return self.inner.model

    @property
    def batch_size(self) -> int:
        return self.inner.batch_size

    def _request(self, instance) -> _Request:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = instance.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        videos = [v for v in (visuals or []) if isinstance(v, str)]
        if len(videos) != 1:
            raise ValueError(f"{MODEL_NAME} answers questions about one video; {task}/{doc_id} gave {visuals!r:.200}")
        kwargs = dict(gen_kwargs)
        if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0) > 0:
            logger.warning("%s decodes greedily; %s asked for sampling (ignored)", MODEL_NAME, task)
        if "max_new_tokens" in kwargs:
            kwargs["max_gen_toks"] = kwargs.pop("max_new_tokens")
        visual = {"type": "video", "video": videos[0], **{k: v for k, v in self.video_options.items() if v is not None}}
        return _Request(task_name=task, doc_id=doc_id, args=(context, kwargs, {"visual": [visual]}))

    def generate_until(self, requests) -> list[str]:
        answers = self.inner.generate_until([self._request(r) for r in requests])
        for request, answer in zip(requests, answers):
            self.cache_hook.add_partial("generate_until", (request.args[0], request.args[1]), answer)
        made = [r for r in self.inner.records if r.get("prefill_ms") is not None]
        if made:
            sparsity = [r["sparsity"] for r in made if r.get("sparsity") is not None]
            logger.info("%s %s: %d answers, mean prefill %.1f ms, mean PSA sparsity %s", MODEL_NAME, self.label,
                        len(made), sum(r["prefill_ms"] for r in made) / len(made),
                        f"{sum(sparsity) / len(sparsity):.3f}" if sparsity else "- (PSA did not run)")
        return answers

    def loglikelihood(self, requests):
        raise NotImplementedError(f"{MODEL_NAME} only generates (generate_until tasks): loglikelihood is not supported")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(f"{MODEL_NAME} answers single-round questions only")
