"""Every Triton launch runs on its tensors' device.

Triton launches on the *current* CUDA device. When a model is split over GPUs (``device_map``),
a layer's tensors may sit on another one, so each op entry point enters
``psa_kernels.utils.on_device(tensor)`` around its launches. On a CPU the guard's logic is tested
with a stand-in CUDA runtime, and every kernel launch of the public ops is checked to happen
inside a guard for the device of the tensors it is given.
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

import psa_kernels
from psa_kernels import utils

pytestmark = pytest.mark.skipif(not psa_kernels.kernels_available("cpu"),
                                reason="the launch checks run the kernels in Triton's CPU interpreter")


def _fake_cuda(monkeypatch, current: int):
    switched = []

    @contextlib.contextmanager
    def device(d):
        switched.append(torch.device(d))
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device", device)
    return switched


@pytest.mark.parametrize("where, switches", [("cuda:1", True), ("cuda:0", False), ("cuda", False), ("cpu", False)])
def test_the_guard_switches_only_to_another_gpu(monkeypatch, where, switches):
    switched = _fake_cuda(monkeypatch, current=0)
    tensor = types.SimpleNamespace(device=torch.device(where))  # only .device is read
    with utils.on_device(tensor):
        pass
    assert switched == ([torch.device(where)] if switches else [])


# module -> the Triton kernels it launches
KERNELS = {
    "psa_kernels.assign": ["_assign_kernel"],
    "psa_kernels.attention": ["_psa_fwd_kernel"],
    "psa_kernels.importance": ["_quantize_kernel", "_antidiagonal_kernel"],
    "psa_kernels.key_blocks": ["_key_blocks_kernel"],
    "psa_kernels.layout": ["_compact_kernel"],
    "psa_kernels.pyramid": ["_pyramid_kernel"],
}
GUARDED_MODULES = ["psa_kernels.assign", "psa_kernels.attention", "psa_kernels.importance", "psa_kernels.key_blocks",
                   "psa_kernels.layout", "psa_kernels.ops"]


def test_every_kernel_launch_is_inside_a_guard_for_its_tensors(monkeypatch):
    import importlib

    guarded: list[torch.device] = []
    launches: list[tuple[str, torch.device | None, set]] = []

    @contextlib.contextmanager
    def spy_guard(t):
        guarded.append(t.device)
        try:
            yield
        finally:
            guarded.pop()

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                devices = {a.device for a in args if isinstance(a, torch.Tensor)}
                launches.append((self.name, guarded[-1] if guarded else None, devices))
                return self.kernel[grid](*args, **kwargs)

            return launch

    for name in GUARDED_MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "on_device"):
            monkeypatch.setattr(module, "on_device", spy_guard)
    monkeypatch.setattr(utils, "on_device", spy_guard)  # the ops that import it when called
    for name, kernels in KERNELS.items():
        module = importlib.import_module(name)
        for kernel in kernels:
            monkeypatch.setattr(module, kernel, Spy(kernel, getattr(module, kernel)))

    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    q = torch.randn(1, 4, 200, 64, generator=g)
    k, v = torch.randn(1, 2, 200, 64, generator=g), torch.randn(1, 2, 200, 64, generator=g)
    common = dict(causal=True, block_q=64, block_k=32)
    level_map = psa_kernels.build_level_map(q, k, compact=True, estimate_precision="fp8", similarity=[0.7] * 4,
                                            thresholds=[0.6, 0.8, 0.9, 0.95], **common)
    psa_kernels.psa_attention(q, k, v, level_map)
    psa_kernels.build_pyramid(k, v)

    launched = {name for name, _, _ in launches}
    assert launched == {k for kernels in KERNELS.values() for k in kernels}, launched
    for name, guard, devices in launches:
        assert guard is not None, f"{name} launched outside on_device()"
        assert devices == {guard}, f"{name} launched for tensors on {devices} inside a guard for {guard}"
