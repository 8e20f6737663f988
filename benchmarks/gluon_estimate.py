"""DRAFT (branch exp-gluon-estimate, never run on a GPU yet): the fp8 antidiagonal estimate's first
phase in Gluon, with each column tile's products in flight while the previous tile's epilogue runs.

Why: Triton 3.6 waits for a tile's products before its epilogue (``warp_group_dot_wait
{pendings = 0}``), so inside a warpgroup the tensor cores idle during every epilogue (ncu: tensor
pipe 35% at 64k). Neither a third program per SM nor taller tiles helped (docs/kernel_notes.md,
fifth session). Here the order is explicit: issue tile c+1's eight products asynchronously, wait
only for tile c's, run tile c's epilogue, repeat.

Layout (one program per (batch x query head, row tile) of 64 strided rows; one program per SM):
- the row tile's eight fp8 query chunks resident in shared memory (64 x 128 bytes each, 64 KB);
- 64-column key tiles (eight chunks, 64 KB) double-buffered, one mbarrier per buffer;
- two 64 x 64 fp32 accumulators in registers (the tile in its epilogue, the tile in flight).

It writes each (strided row, key block) log-sum-exp (base 2) to ``lse [B*Hq, n_rows, nk]``, as the
Triton kernel writes its scratch strip; :func:`importance_from_lse` finishes in PyTorch (the
second phase, to check the numbers; the Triton kernel does it in the same program).

    python benchmarks/gluon_estimate.py --lengths 16384,32768,65536   # on the GPU: check + time

Offline (no GPU): ``python benchmarks/gluon_estimate.py --offline`` compiles it for sm_90.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia import hopper  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma  # noqa: E402
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: E402

_LOG2E = 1.4426950408889634


@gluon.jit
def _issue_tile(q_smem, k_bufs, buf, acc_layout: gl.constexpr, S: gl.constexpr, BLOCK_R: gl.constexpr,
                BLOCK_C: gl.constexpr):
    """The eight antidiagonal products of one column tile, chained and left in flight."""
    acc = gl.zeros([BLOCK_R, BLOCK_C], gl.float32, acc_layout)
    for i in gl.static_range(S):
        acc = hopper.warpgroup_mma(q_smem.index(i), k_bufs.index(buf * S + i).permute((1, 0)), acc, is_async=True)
    return acc


@gluon.jit
def _load_tile(K_DESC, k_bufs, k_bars, buf, key_row0, pred, S: gl.constexpr, BLOCK_C: gl.constexpr,
               BLOCK_D: gl.constexpr):
    bar = k_bars.index(buf)
    mbarrier.expect(bar, S * BLOCK_C * BLOCK_D, pred=pred)
    for i in gl.static_range(S):
        tma.async_copy_global_to_shared(K_DESC, [key_row0, i * BLOCK_D], bar, k_bufs.index(buf * S + i), pred=pred)


@gluon.jit
def _epilogue(acc, c0, m, row_ok, row_last, first_last, row_scale, SK, LSE, lse_row_base, kcol_base, n_cols, nk,
              CAUSAL: gl.constexpr, S: gl.constexpr, BLOCK_R: gl.constexpr, BLOCK_C: gl.constexpr,
              COLS_PER_BLOCK: gl.constexpr, acc_layout: gl.constexpr):
    """Tile ``[c0, c0 + BLOCK_C)``: each row's log-sum-exp per key block, stored (the Triton
    kernel's epilogue, with the column vectors loaded straight into the accumulator's layout)."""
    KBLOCKS: gl.constexpr = BLOCK_C // COLS_PER_BLOCK
    cols = c0 + gl.arange(0, BLOCK_C, layout=gl.SliceLayout(0, acc_layout))
    col_scale = gl.load(SK + kcol_base + cols, mask=cols < n_cols, other=0.0)
    col_bias = gl.where(col_scale > 0, 0.0, float("-inf"))
    t = acc * col_scale[None, :] + col_bias[None, :]
    if CAUSAL:
        if (c0 + BLOCK_C - 1) * S >= first_last + 1:
            t = gl.where((cols * S)[None, :] < (row_last + 1)[:, None], t, float("-inf"))
    t = t * row_scale[:, None]
    per_block = gl.reshape(t, [BLOCK_R, KBLOCKS, COLS_PER_BLOCK])
    bm = gl.max(per_block, 2)
    bm_safe = gl.where(bm == float("-inf"), 0.0, bm)
    bs = gl.sum(gl.exp2(per_block - bm_safe[:, :, None]), 2)
    block_lse = gl.where(bs > 0, bm_safe + gl.log2(gl.maximum(bs, 1e-30)), float("-inf"))
    # Stored from the reduction's own layout (the row vectors' conversion to it moves nothing:
    # both spread the rows alike), so no shared-memory round trip and no barrier per tile.
    out_layout: gl.constexpr = block_lse.type.layout
    rows = gl.convert_layout(m, gl.SliceLayout(1, out_layout))
    ok = gl.convert_layout(row_ok, gl.SliceLayout(1, out_layout))
    j = c0 // COLS_PER_BLOCK + gl.arange(0, KBLOCKS, layout=gl.SliceLayout(0, out_layout))
    gl.store(LSE + lse_row_base + rows[:, None].to(gl.int64) * nk + j[None, :], block_lse,
             mask=ok[:, None] & (j < nk)[None, :])


@gluon.jit
def _estimate_phase1_kernel(
    Q_DESC, K_DESC, SQ, SK, LSE, scale_log2,
    Hq, GROUP, Hkv, Lq, Lk, n_rows, n_cols, nk,
    CAUSAL: gl.constexpr, S: gl.constexpr, BLOCK_R: gl.constexpr, BLOCK_C: gl.constexpr,
    BLOCK_D: gl.constexpr, COLS_PER_BLOCK: gl.constexpr,
):
    tile = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_C, 32])
    row_layout: gl.constexpr = gl.SliceLayout(1, acc_layout)

    q_smem = gl.allocate_shared_memory(gl.float8e4nv, [S, BLOCK_R, BLOCK_D], Q_DESC.layout)
    k_bufs = gl.allocate_shared_memory(gl.float8e4nv, [2 * S, BLOCK_C, BLOCK_D], K_DESC.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar.index(0), count=1)
    mbarrier.init(k_bars.index(0), count=1)
    mbarrier.init(k_bars.index(1), count=1)

    m = tile * BLOCK_R + gl.arange(0, BLOCK_R, layout=row_layout)
    row_ok = m < n_rows
    row_last = (Lk - Lq) + gl.minimum(m * S + S - 1, Lq - 1)
    first_last = (Lk - Lq) + gl.minimum(tile * BLOCK_R * S + S - 1, Lq - 1)
    last_last = (Lk - Lq) + gl.minimum((tile * BLOCK_R + BLOCK_R - 1) * S + S - 1, Lq - 1)
    if CAUSAL:
        col_end = gl.minimum(n_cols, last_last // S + 1)
    else:
        col_end = n_cols
    n_tiles = gl.cdiv(col_end, BLOCK_C)
    row_scale = gl.load(SQ + bh * n_rows + m, mask=row_ok, other=0.0) * scale_log2
    row_scale = gl.maximum(row_scale, 1e-30)
    key_row0 = (b * Hkv + hk) * n_cols  # this kv head's first row in the 2-D key copy and its scales
    lse_row_base = bh.to(gl.int64) * n_rows * nk

    mbarrier.expect(q_bar.index(0), S * BLOCK_R * BLOCK_D)
    for i in gl.static_range(S):
        tma.async_copy_global_to_shared(Q_DESC, [bh * n_rows + tile * BLOCK_R, i * BLOCK_D], q_bar.index(0),
                                        q_smem.index(i))
    _load_tile(K_DESC, k_bufs, k_bars, 0, key_row0, True, S, BLOCK_C, BLOCK_D)
    _load_tile(K_DESC, k_bufs, k_bars, 1, key_row0 + BLOCK_C, n_tiles > 1, S, BLOCK_C, BLOCK_D)
    mbarrier.wait(q_bar.index(0), 0)
    mbarrier.wait(k_bars.index(0), 0)
    hopper.fence_async_shared()
    acc = _issue_tile(q_smem, k_bufs, 0, acc_layout, S, BLOCK_R, BLOCK_C)
    for c in range(0, n_tiles - 1):
        nbuf = (c + 1) % 2
        mbarrier.wait(k_bars.index(nbuf), ((c + 1) // 2) & 1)
        nxt = _issue_tile(q_smem, k_bufs, nbuf, acc_layout, S, BLOCK_R, BLOCK_C)
        cur = hopper.warpgroup_mma_wait(num_outstanding=S, deps=[acc])  # tile c done, tile c+1 in flight
        _load_tile(K_DESC, k_bufs, k_bars, c % 2, key_row0 + (c + 2) * BLOCK_C, c + 2 < n_tiles,
                   S, BLOCK_C, BLOCK_D)
        _epilogue(cur, c * BLOCK_C, m, row_ok, row_last, first_last, row_scale, SK, LSE, lse_row_base, key_row0,
                  n_cols, nk, CAUSAL, S, BLOCK_R, BLOCK_C, COLS_PER_BLOCK, acc_layout)
        acc = nxt
    cur = hopper.warpgroup_mma_wait(num_outstanding=0, deps=[acc])
    _epilogue(cur, (n_tiles - 1) * BLOCK_C, m, row_ok, row_last, first_last, row_scale, SK, LSE, lse_row_base,
              key_row0, n_cols, nk, CAUSAL, S, BLOCK_R, BLOCK_C, COLS_PER_BLOCK, acc_layout)
    mbarrier.invalidate(q_bar.index(0))
    mbarrier.invalidate(k_bars.index(0))
    mbarrier.invalidate(k_bars.index(1))


def estimate_lse(q, k, *, causal=True, scale=None, stride=8, block_k=128, block_r=64, block_c=64):
    """First phase: ``lse [B*Hq, n_rows, nk]`` (-inf where not written) from fp8 copies of q, k."""
    from psa_kernels.importance import quantize_qk
    from psa_kernels.utils import cdiv

    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    assert D == 128 and stride == 8, "draft: D = 128, stride 8"
    scale = D**-0.5 if scale is None else float(scale)
    if scale < 0:
        q, scale = -q, -scale
    q8, sq, k8, sk = quantize_qk(q, k, stride)
    n_rows, n_cols, nk = cdiv(Lq, stride), cdiv(Lk, stride), cdiv(Lk, block_k)
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
    q2 = q8.view(B * Hq * n_rows, stride * D)
    k2 = k8.view(B * Hkv * n_cols, stride * D)
    q_desc = TensorDescriptor.from_tensor(q2, [block_r, D], layout)
    k_desc = TensorDescriptor.from_tensor(k2, [block_c, D], layout)
    lse = torch.full((B * Hq, n_rows, nk), float("-inf"), dtype=torch.float32, device=q.device)
    grid = (cdiv(n_rows, block_r), B * Hq)
    _estimate_phase1_kernel[grid](
        q_desc, k_desc, sq, sk, lse, scale / stride * _LOG2E,
        Hq, Hq // Hkv, Hkv, Lq, Lk, n_rows, n_cols, nk,
        CAUSAL=causal, S=stride, BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_D=D, COLS_PER_BLOCK=block_k // stride,
        num_warps=4,
    )
    return lse


def importance_from_lse(lse, B, Hq, Lq, *, stride=8, block_q=128):
    """Second phase in PyTorch: ``[B, Hq, nq, nk]`` as the Triton kernel's output."""
    n_rows = lse.shape[1]
    row = torch.logsumexp(lse * 0.6931471805599453, -1, keepdim=True) / 0.6931471805599453
    p = torch.exp2(lse - row).nan_to_num(0.0)
    rows_per = block_q // stride
    pad = (-n_rows) % rows_per
    p = torch.nn.functional.pad(p, (0, 0, 0, pad))
    return p.view(B, Hq, -1, rows_per, lse.shape[-1]).sum(3)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="16384,32768,65536")
    parser.add_argument("--offline", action="store_true", help="compile for sm_90 without a GPU and report")
    args = parser.parse_args(argv)
    if args.offline:
        from benchmarks.offline_compile import report, sm90_compiler

        q = torch.randn(1, 28, 4096, 128, dtype=torch.bfloat16)
        k = torch.randn(1, 4, 4096, 128, dtype=torch.bfloat16)
        with sm90_compiler() as compiled:
            try:
                estimate_lse(q, k)
            except Exception as err:  # noqa: BLE001 - the quantisation launch is intercepted too
                print(f"{type(err).__name__}: {str(err)[:2000]}")
            for name, kernel in compiled:
                if kernel is not None:
                    report(f"gluon:{name}", kernel, Path("/tmp/gluon_estimate"))
        return 0
    from triton.testing import do_bench

    from psa_kernels.importance import antidiagonal_importance_triton

    for L in (int(x) for x in args.lengths.split(",")):
        q = torch.randn(1, 28, L, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 4, L, 128, device="cuda", dtype=torch.bfloat16)
        want = antidiagonal_importance_triton(q, k, causal=True, precision="fp8")
        got = importance_from_lse(estimate_lse(q, k), 1, 28, L)
        err = ((got - want).norm() / want.norm()).item()
        t_triton = do_bench(lambda: antidiagonal_importance_triton(q, k, causal=True, precision="fp8"),
                            warmup=10, rep=50, return_mode="median")
        t_gluon = do_bench(lambda: estimate_lse(q, k), warmup=10, rep=50, return_mode="median")
        print(f"L {L}: rel err {err:.2e}  triton (both phases) {t_triton:.3f} ms  gluon (phase 1 + fill) "
              f"{t_gluon:.3f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
