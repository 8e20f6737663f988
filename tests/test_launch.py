"""The launch helper (``psa_kernels.utils.launch_kernel``): Triton's own launch the first time a
specialisation is seen, the compiled kernel's launcher directly after that.

On the GPU every kernel of a PSA call goes through it (``tests/gpu/check_kernels.py`` checks the
results there); here its bookkeeping is checked against a stand-in for a ``@triton.jit`` kernel
whose binder specialises like Triton's (an int argument by its divisibility by 16).
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from psa_kernels import utils  # noqa: E402


class FakeCompiled:
    def __init__(self, spec):
        self.spec, self.function, self.packed_metadata, self.launches = spec, object(), object(), []

    def run(self, g0, g1, g2, stream, function, packed, metadata, enter_hook, exit_hook, *args):
        assert function is self.function and packed is self.packed_metadata
        self.launches.append(((g0, g1, g2), stream, args, metadata, enter_hook, exit_hook))


class FakeKernel:
    """What :func:`launch_kernel` reads of a JITFunction: ``device_caches`` (created at the first
    launch on a device, holding the binder at index 4), ``pre_run_hooks`` and ``kernel[grid]``."""

    def __init__(self):
        self.device_caches, self.pre_run_hooks, self.compiled, self.jit_launches = {}, [], {}, []

    @staticmethod
    def binder(x, n, *, BLOCK, num_warps=4):
        specialization = [("*fp32", "D"), ("i32", "D" if n % 16 == 0 else ""), ("constexpr", BLOCK)]
        return {"x": x, "n": n, "BLOCK": BLOCK}, specialization, {"num_warps": num_warps}

    def __getitem__(self, grid):
        def jit(*args, **options):
            self.device_caches.setdefault(0, ({}, {}, None, None, self.binder))
            _, spec, rest = self.binder(*args, **options)
            key = (tuple(spec), tuple(rest.items()))
            compiled = self.compiled.setdefault(key, FakeCompiled(key))
            self.jit_launches.append((grid, args, options))
            return compiled

        return jit


class FakeDriver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 1234


@pytest.fixture
def fake_driver(monkeypatch):
    from triton.runtime.driver import driver

    monkeypatch.setattr(driver, "_active", FakeDriver())
    monkeypatch.setattr(utils, "_compiled", {})
    yield


def test_launch_takes_tritons_path_first_then_the_compiled_launcher(fake_driver):
    kernel = FakeKernel()
    first = utils.launch_kernel(kernel, (4,), "x", 32, BLOCK=64, num_warps=8)
    assert len(kernel.jit_launches) == 1 and first.launches == []
    again = utils.launch_kernel(kernel, (5, 2), "y", 48, BLOCK=64, num_warps=8)  # same specialisation
    assert again is first and len(kernel.jit_launches) == 1
    (grid, stream, args, metadata, enter, exit_), = first.launches
    assert grid == (5, 2, 1) and stream == 1234 and args == ("y", 48, 64)
    assert metadata is None and enter is None and exit_ is None


@pytest.mark.parametrize("change", ["divisibility", "constexpr", "option"])
def test_a_new_specialisation_compiles_through_triton(fake_driver, change):
    kernel = FakeKernel()
    utils.launch_kernel(kernel, (1,), "x", 32, BLOCK=64)
    args, kwargs = {"divisibility": (("x", 33), dict(BLOCK=64)), "constexpr": (("x", 32), dict(BLOCK=128)),
                    "option": (("x", 32), dict(BLOCK=64, num_warps=8))}[change]
    other = utils.launch_kernel(kernel, (1,), *args, **kwargs)
    assert len(kernel.jit_launches) == 2 and other.launches == []
    utils.launch_kernel(kernel, (3,), *args, **kwargs)
    assert len(kernel.jit_launches) == 2 and len(other.launches) == 1


def test_launch_hooks_and_pre_run_hooks_keep_tritons_path(fake_driver):
    from triton import knobs

    chain = knobs.runtime.launch_enter_hook  # a profiler's hook (Triton 3.6+: a chain, empty by default)
    if not hasattr(chain, "add"):
        pytest.skip("this Triton keeps launch hooks differently")
    kernel = FakeKernel()
    utils.launch_kernel(kernel, (1,), "x", 32, BLOCK=64)
    hook = lambda metadata: None  # noqa: E731
    chain.add(hook)
    try:
        utils.launch_kernel(kernel, (1,), "x", 32, BLOCK=64)
    finally:
        chain.remove(hook)
    kernel.pre_run_hooks.append(hook)
    utils.launch_kernel(kernel, (1,), "x", 32, BLOCK=64)
    assert len(kernel.jit_launches) == 3
    kernel.pre_run_hooks.clear()
    compiled = utils.launch_kernel(kernel, (1,), "x", 32, BLOCK=64)
    assert len(kernel.jit_launches) == 3 and len(compiled.launches) == 1


def test_interpreted_kernels_launch_as_given():
    calls = []

    class Interpreted:  # no device_caches: Triton's interpreter
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append((grid, a, k)) or "ran"

    assert utils.launch_kernel(Interpreted(), (2,), 1, B=3) == "ran" and calls == [((2,), (1,), {"B": 3})]
