"""psa_kernels: the ops of Pyramid Sparse Attention, one public entry point each.

Every op here has the same signature as its dense PyTorch definition in
:mod:`psa_kernels.reference`, which is the ground truth the tests compare against. The Triton
kernels serve CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``); elsewhere attention
runs block by block through SDPA (:mod:`psa_kernels.blockwise`) and the other ops as the
reference (:mod:`psa_kernels.ops` says exactly when).

- :func:`psa_attention` - the attention itself, given a level map ``[B, Hm, nq, nk]``.
  :func:`attention_kernel` says which kernel a CUDA call takes (the Hopper kernel in Gluon,
  :mod:`psa_kernels.attention_hopper`, or the Triton kernel, :mod:`psa_kernels.attention`).
- :func:`build_level_map` - mask generation (importance, level assignment, similarity cap,
  forced blocks) for a preset's parameters.
- :func:`build_pyramid` - the mean-pooled 2x/4x/8x K/V with valid-token counts.
- :func:`density` / :func:`sparsity` - the cost of a level map (the paper's definition).
- :func:`dense_attention` - the dense fallback with PSA's conventions (bottom-right causal
  alignment, rows with no visible key return 0).

The import name is ``psa_kernels`` (the source lives in the repository's ``kernels/``): the
name ``kernels`` belongs to Hugging Face's kernels package, which transformers probes.
"""

# A checkout's root on sys.path (``python -m ...`` from the repository) makes this folder
# importable as ``kernels``: the name of Hugging Face's kernels package, which transformers probes
# with find_spec + import. Under that name the module stays empty, so the probe sees no version
# and ``transformers.utils.is_kernels_available()`` is unchanged.
if __name__ != "kernels":
    from .ops import *  # noqa: F401,F403
    from .ops import __all__  # noqa: F401
