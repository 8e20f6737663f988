"""lm-eval task files (YAML + utils.py) and the small synthetic benchmark; see docs/evaluation.md."""
