"""Long-video QA evaluation on lm-eval: tasks (``eval_tasks/``), the ``psa-qwen2.5-vl`` model,
scoring, the synthetic benchmark and the ``psa-vlm eval`` runner (``docs/evaluation.md``).

Import :mod:`psa_vlm.evaluation.lm` to register the model with lm-eval (the task files do).
"""
