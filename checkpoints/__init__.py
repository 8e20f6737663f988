"""Trained checkpoints shipped with psa-vlm (package data): ``vniah/``, the V-NIAH model."""
