"""Test-session setup and the fixtures tests share.

Without a GPU, the Triton kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET`` must be
set before any kernel module is imported (Triton reads it when a kernel is decorated).

The suite runs on pytest-xdist workers (``-n auto`` in pyproject's ``addopts``): each worker gets
its share of the cores for torch's threads, so workers do not oversubscribe the machine, and the
longest tests are collected first so that no worker is left with a long tail.

``@pytest.mark.slow`` tests (the exhaustive sweeps: every model test on the Triton interpreter,
all Hypothesis examples on the interpreter, the full V-NIAH gate) are left out by default;
``python -m pytest -m slow`` runs them (``.ci/run`` does, after the quick start).
"""

from __future__ import annotations

import os

import pytest


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core this process may use (xdist's own guess counts physical
    cores, one on a two-vCPU machine)."""
    return _cores()


def _is_xdist_controller(config) -> bool:
    return not hasattr(config, "workerinput") and config.getoption("dist", "no") != "no"


def pytest_configure(config):
    if _is_xdist_controller(config):
        return  # it only hands out tests: no torch here, the workers start sooner
    # This process's share of the cores (1/N under N workers), set before torch is imported;
    # the subprocesses tests start (torchrun, lm-eval, notebook kernels) inherit it.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // max(1, workers))))
    os.environ.setdefault("MKL_NUM_THREADS", threads)

    import torch

    torch.set_num_threads(int(threads))
    # A failing PSA call must fail the test, not fall back to dense attention quietly.
    os.environ.setdefault("PSA_VLM_STRICT", "1")
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ.get("TRITON_INTERPRET") == "1":
        _patch_the_interpreter_once_per_launch()
    _import_the_kernels()


def _patch_the_interpreter_once_per_launch() -> bool:
    """Make Triton's CPU interpreter patch ``triton.language`` once per kernel launch, not once
    per call of a nested ``@triton.jit`` function.

    The interpreter swaps every builtin of ``tl``/``tl.core`` for an interpreted one when a
    launch starts, and again (``inspect.getmembers`` over the modules) on every call of a jitted
    helper inside the kernel: ``tl.sort``'s compare-and-swap steps, our own row helpers. Within one
    launch nothing undoes the first patch until the launch ends, so the repeats do nothing but
    cost: 60% of a mask-generator test's time (50 s -> 20 s for one example, the same level maps
    bit for bit). Only the repeats are skipped; the launch's own patch and restore stay Triton's.
    Returns whether the patch applied (False on a Triton whose interpreter is laid out otherwise:
    the tests then run at Triton's own speed)."""
    try:
        from triton.runtime import interpreter
    except Exception:  # noqa: BLE001 - no Triton, or no interpreter in it
        return False
    patch_lang = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    lang = getattr(interpreter, "tl", None)
    if patch_lang is None or executor is None or lang is None or getattr(patch_lang, "once_per_launch", False):
        return False
    launch = {"running": False, "patched": set()}

    class _Nothing:
        def restore(self):
            pass

    def patch_once(fn):
        # _patch_lang patches the language modules the function's globals hold: key by those.
        key = tuple(sorted(id(v) for v in fn.__globals__.values() if v is lang or v is lang.core))
        if launch["running"] and key in launch["patched"]:
            return _Nothing()
        scope = patch_lang(fn)
        if launch["running"]:
            launch["patched"].add(key)
        return scope

    run_launch = executor.__call__

    def run_once_patched(self, *args, **kwargs):
        if launch["running"]:  # not expected (launches do not nest); Triton's own path
            return run_launch(self, *args, **kwargs)
        launch.update(running=True, patched=set())
        try:
            return run_launch(self, *args, **kwargs)
        finally:
            launch.update(running=False, patched=set())

    patch_once.once_per_launch = True
    interpreter._patch_lang = patch_once
    executor.__call__ = run_once_patched
    return True


def _import_the_kernels():
    """Import Triton and every kernel module now, while ``TRITON_INTERPRET`` holds its session
    value: ``@triton.jit`` picks interpreter or compiler when a function is decorated, Triton's
    own ``tl.*`` helpers included, and a test that unsets the variable (to run the PyTorch path)
    must not be the first to import them, or every later interpreter test fails."""
    import importlib
    import pkgutil

    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - no Triton: the kernels are never used
        return
    import psa_kernels

    for module in pkgutil.iter_modules(psa_kernels.__path__):
        importlib.import_module(f"psa_kernels.{module.name}")


# --------------------------------------------------------------------------- scheduling

#: Tests that take tens of seconds each, about longest first: collected before everything else,
#: so that xdist (handing out tests one at a time, two queued per worker) starts them first and
#: the short tests fill the gaps (matched by node-id prefix). The two gate tests are apart: the
#: first two go to one worker's queue.
LONG_TESTS = (
    "tests/test_vniah_checkpoint.py::test_dense_and_default_psa_keep_the_recorded_accuracy",  # slow
    "tests/test_vniah_checkpoint.py::test_keeps_the_recorded_accuracy_on_the_first_questions[vniah-psa]",
    "tests/test_vniah_checkpoint.py::test_keeps_the_recorded_accuracy_on_the_first_questions[vniah-coverage-",
    "tests/test_evaluation.py::test_lm_eval_command_line_runs_the_tasks",
    "tests/test_vniah_checkpoint.py::test_keeps_the_recorded_accuracy_on_the_first_questions[vniah-sdpa]",
    "tests/test_kernels.py::test_property_random_shapes_and_maps",
    "tests/test_windows.py::test_a_preset_on_the_vision_tower_runs_its_frame_groups_in_one_psa_call_per_length",
    "tests/test_evaluation.py::test_data_parallel_shards_the_questions_and_merges_the_report",
    "tests/test_reference.py::test_mask_generator_invariants_on_the_kernels",
    "tests/test_kernels.py::test_budget_assignment_matches_the_reference_exactly",
    "tests/test_kernels.py::test_fused_assignment_matches_the_reference_exactly",
    "tests/test_tiny_model.py::test_tiny_model_dir_builds_on_every_rank_of_a_process_group",
    "tests/test_evaluation.py::test_plain_lm_eval_runs_the_task_files",
    "tests/test_notebooks.py::test_notebook_executes",
    "tests/test_evaluation.py::test_runner_compares_sdpa_and_psa_on_the_tiny_model",
    "tests/test_needles.py::test_training",
    "tests/test_needles.py::test_vniah",
    "tests/test_evaluation.py::test_batches_left_pad_and_match_single_answers",
    "tests/test_evaluation.py::test_interrupted_run_resumes_without_losing_or_repeating",
    "tests/test_kernels.py::test_launch_variants_compute_the_same",
    "tests/test_integration.py::test_hf_kernels_probe_is_unchanged",
    "tests/test_integration.py::test_psa_kernels_imports_from_anywhere",
    "tests/test_video.py::test_ask_on_a_bad_video_prints_one_line",
    "tests/test_kernels.py::test_matrix_against_reference",
    "tests/test_benchmarks.py::test_attention_benchmark_smoke",
    "tests/test_cli_and_packaging.py::test_wheel_contains_both_packages_and_the_presets",
)


def _rank(item) -> int:
    node = item.nodeid.replace(os.sep, "/")
    for rank, prefix in enumerate(LONG_TESTS):
        if node.startswith(prefix) or node.endswith("/" + prefix):
            return rank
    return len(LONG_TESTS)


def pytest_collection_modifyitems(config, items):
    # A stable sort: the same order on every xdist worker (xdist checks that collections agree).
    items.sort(key=_rank)


# --------------------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="session")
def tiny_model_path():
    """The offline tiny model in the default cache (``PSA_VLM_CACHE``), built at most once per
    test run: the first worker to get here builds it while the others wait on a lock; what
    ``--model tiny`` and ``load_model("tiny")`` load."""
    from psa_vlm.testing import default_cache_dir, tiny_model_dir

    cache = default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: tiny_model_dir is safe under concurrent builds anyway
        return tiny_model_dir(cache)
    with open(cache / ".tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return tiny_model_dir(cache)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def tiny_processor():
    """The tiny model's processor (read-only: tests must not change it)."""
    from psa_vlm.testing import build_tiny_processor

    return build_tiny_processor()


@pytest.fixture(params=["reference", pytest.param("interpreter", marks=pytest.mark.slow)])
def kernels_path(request, monkeypatch):
    """Which implementation a model-level test's PSA calls run on a CPU: ``reference`` (the
    PyTorch path a CPU user gets; the kernels are checked against it in test_kernels.py) or
    ``interpreter`` (the Triton kernels in Triton's CPU interpreter: a minute or more per model
    test, so ``slow``). Where CUDA is present no interpreter is set, and CPU tensors take the
    PyTorch path under both."""
    import torch

    if request.param == "reference" and not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return request.param
