"""lm-eval task functions for the YAML files beside this one (``!function utils.<name>``).

The logic lives in :mod:`psa_vlm.evaluation.tasks`; importing it also registers the
``psa-qwen2.5-vl`` model with lm-eval, so ``lm_eval --include_path eval_tasks --model
psa-qwen2.5-vl`` finds it.
"""

from psa_vlm.evaluation import lm as _register  # noqa: F401  (registers "psa-qwen2.5-vl")
from psa_vlm.evaluation.tasks import (  # noqa: F401
    acc_long,
    acc_medium,
    acc_short,
    doc_to_text,
    doc_to_visual,
    load_egoschema,
    load_longvideobench,
    load_mlvu,
    load_videomme,
    load_videomme_subtitles,
    m_avg,
    process_results,
    process_results_mlvu,
    process_results_videomme,
)
from psa_vlm.evaluation.scoring import accuracy  # noqa: F401
