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

# A checkout's root on sys.path (``python -m ...`` or ``python -c`` from the repository) makes
# this folder importable as ``kernels``: the name of Hugging Face's kernels package, which
# transformers 5.25 installs and imports (``from kernels import CUDAProperties, ...``) as soon as
# its modeling code loads. Under that name this module hands over to that package when one is
# installed further down sys.path (an import returns whatever ``sys.modules`` holds once the
# module's code has run), and stays empty otherwise, so the probe finds no version.
if __name__ == "kernels":
    def _hand_over_to_installed_kernels() -> None:
        import importlib.util
        import os
        import sys
        from importlib.machinery import PathFinder

        checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

        def is_checkout(entry: str) -> bool:
            try:
                return os.path.samefile(entry or os.getcwd(), checkout)
            except OSError:
                return False

        spec = PathFinder.find_spec("kernels", [e for e in sys.path if isinstance(e, str) and not is_checkout(e)])
        if spec is None or spec.loader is None:
            return
        this = sys.modules["kernels"]
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules["kernels"] = this
            raise

    _hand_over_to_installed_kernels()
    del _hand_over_to_installed_kernels
else:
    from .ops import *  # noqa: F401,F403
    from .ops import __all__  # noqa: F401
