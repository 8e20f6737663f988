"""Timing a generation: where the prefill ends."""

from __future__ import annotations

import time


class FirstTokenClock:
    """A logits processor noting when the first token's logits exist: the end of the prefill
    (``cuda``: after the GPU finished it). ``on_first`` runs then, e.g. to read the prefill's
    PSA statistics before the decode steps add theirs. Pass it in ``generate(logits_processor=[clock])``
    and read ``clock.at`` (a ``time.perf_counter()`` value, None before the first token)."""

    def __init__(self, cuda: bool = False, on_first=None):
        self.cuda, self.on_first, self.at = cuda, on_first, None

    def __call__(self, input_ids, scores):
        if self.at is None:
            if self.cuda:
                import torch

                torch.cuda.synchronize()
            self.at = time.perf_counter()
            if self.on_first is not None:
                self.on_first()
        return scores
