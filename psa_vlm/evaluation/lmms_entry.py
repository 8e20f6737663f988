"""Where lmms-eval finds ``psa_qwen2_5_vl``: the ``lmms_eval.models`` entry point.

Kept apart from :mod:`psa_vlm.evaluation.lmms` on purpose. lmms-eval builds its model registry
while ``lmms_eval.models`` is first imported and loads every entry point then. Had the entry point
named the model's own module, importing that module first (which imports ``lmms_eval.models``)
would make lmms-eval load it half-initialised, fail, and leave the model out of the registry for
the rest of the process. This module imports nothing from lmms-eval until it is called, and names
the model's class by its path.
"""

from __future__ import annotations

MODEL_NAME = "psa_qwen2_5_vl"
MODEL_CLASS = "psa_vlm.evaluation.lmms.PSAQwen2_5_VL"


def manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval's manifest of ``psa_qwen2_5_vl``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=MODEL_CLASS)
