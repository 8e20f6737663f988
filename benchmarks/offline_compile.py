"""Compile the project's Triton kernels for a Hopper GPU (sm_90) on a machine without one.

    python benchmarks/offline_compile.py [--only attn_n64_w4,importance] [--out DIR]

Registers, spills and shared memory come from ``ptxas -v`` (bundled with Triton); the TTGIR shows
whether loads became asynchronous copies (``async_copy_global_to_local``, TMA ``async_tma_copy``)
and whether dots became Hopper ``warp_group_dot`` (wgmma). This costs no GPU time, so use it to
check a kernel's structure before timing it on the device. A fake driver answers Triton's device
queries (current device 0, target ``cuda:90``); the kernels are specialised exactly as a real
launch would specialise them (the wrappers run with CPU tensors and ``launch`` is intercepted).

Triton here may be newer than on the GPU machine (3.8 vs 3.6): read the output as a guide.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class _FakeCudaDriver:
    """Enough of Triton's driver interface to compile (not run) for sm_90."""

    def __init__(self, real):
        from triton.backends.compiler import GPUTarget

        self._real = real
        self.target = GPUTarget("cuda", 90, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def __getattr__(self, name):
        return getattr(self._real, name)


@contextlib.contextmanager
def sm90_compiler():
    """Within: ``kernel[grid](...)`` compiles for sm_90 and returns the compiled kernel unlaunched."""
    import triton
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    compiled = []
    fake = _FakeCudaDriver(CudaDriver.__new__(CudaDriver))
    driver.set_active(fake)
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    JITFunction.run = run
    old_interp = os.environ.pop("TRITON_INTERPRET", None)
    from psa_kernels import utils

    fast, utils.FAST_LAUNCH = utils.FAST_LAUNCH, False  # nothing is launched here
    try:
        yield compiled
    finally:
        utils.FAST_LAUNCH = fast
        JITFunction.run = original
        driver._active = None  # the real driver again on next use (none on a machine without a GPU)
        if old_interp is not None:
            os.environ["TRITON_INTERPRET"] = old_interp
        _ = triton


def compile_and_report(label: str, call, out: Path | None, keep=lambda name: True) -> None:
    """Compile for sm_90 what ``call()`` launches (nothing runs) and :func:`report` each compiled
    kernel whose name ``keep`` accepts, as ``label:name``. A failure prints its error's tail (where
    the cause is) and the kernels compiled before it are still reported: the experiments' offline
    mode."""
    with sm90_compiler() as compiled:
        try:
            call()
        except Exception as err:  # noqa: BLE001 - report what did compile
            print(f"{label}: {type(err).__name__}: {str(err)[-3000:]}")
        for name, kernel in compiled:
            if kernel is not None and keep(name):
                report(f"{label.replace(' ', '_')}:{name}", kernel, out)


def report(name, kernel, out: Path | None):
    """Registers, spills, shared memory, and what the TTGIR made of the loads and dots."""
    import triton

    asm = kernel.asm
    ttgir = asm.get("ttgir", "")
    ptx = asm.get("ptx", "")
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    info = ""
    if ptx:
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"{name}.ptx"
        tmp.write_text(ptx)
        res = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", str(tmp), "-o", os.devnull],
                             capture_output=True, text=True)
        info = res.stderr
    regs = re.search(r"Used (\d+) registers", info)
    stack = re.search(r"(\d+) bytes stack frame", info)
    spill = re.findall(r"(\d+) bytes spill stores", info)
    counts = {
        "wgmma": ttgir.count("warp_group_dot "),
        "mma(v2)": len(re.findall(r"tt\.dot ", ttgir)),
        "async cp": ttgir.count("async_copy_global_to_local"),
        "tma load": ttgir.count("async_tma_copy_global_to_local") + ttgir.count("descriptor_load"),
        "sync load": len(re.findall(r"= tt\.load ", ttgir)),
    }
    smem = kernel.metadata.shared if hasattr(kernel, "metadata") else None
    print(f"{name:32s} regs {regs.group(1) if regs else '?':>4s}  stack {stack.group(1) if stack else '?':>5s}  "
          f"spill {','.join(spill) or '0':>6s}  smem {smem}  "
          + "  ".join(f"{k} {v}" for k, v in counts.items()))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for key in ("ttgir", "ptx"):
            if key in asm:
                (out / f"{name}.{key}").write_text(asm[key])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write each kernel's TTGIR and PTX here")
    parser.add_argument("--L", type=int, default=4096)
    parser.add_argument("--only", default="",
                        help="comma list of case labels (benchmarks/offline_cases.py) or their prefixes; default all")
    args = parser.parse_args(argv)
    only = [x for x in args.only.split(",") if x]
    out = Path(args.out) if args.out else None
    from benchmarks.offline_cases import cases

    with sm90_compiler() as compiled:
        for label, fn in cases(args.L):
            if only and not any(label == x or label.startswith(x + "_") for x in only):
                continue
            start = len(compiled)
            try:
                fn()
            except Exception as err:  # noqa: BLE001 - keep compiling the others
                print(f"{label}: {type(err).__name__}: {str(err)[:400]}")
                continue
            for name, kernel in compiled[start:]:
                if kernel is not None:
                    report(f"{label}:{name}", kernel, out)


if __name__ == "__main__":
    main()
