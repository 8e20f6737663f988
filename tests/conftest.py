"""Test-session setup.

Without a GPU, the Triton kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET`` must be
set before any kernel module is imported (Triton reads it when a kernel is decorated).
"""

import os

import torch

# A failing PSA call must fail the test, not fall back to dense attention quietly.
os.environ.setdefault("PSA_VLM_STRICT", "1")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
