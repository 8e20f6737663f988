"""EXPERIMENT (not used by the package): the fp8 antidiagonal estimate's first phase in Gluon
(Triton's explicit dialect), each column tile's products in flight while the previous tile's
epilogue runs, plus switches that time the pipeline's parts.

Measured on an H200 (2026-12-02, ``benchmarks/results/gluon_estimate_h200/``; the Triton kernel
does both phases in 2.7 ms at 64k, 0.69 ms at 32k, without its 0.19 / 0.10 ms quantisation):
- As first written it was 1.75x slower than the Triton kernel: ptxas serialised every product
  (``C7514: wgmma.mma_async instructions are serialized due to non wgmma instructions reading
  accumulator registers``), because handing the tile in flight from one loop-carried variable to
  another copied its registers while its products ran. With the loop unrolled by two and each
  accumulator in fixed registers the warning is gone and the products alone (no epilogue, keys
  read once) take 1.28 ms at 64k (about 1.5 PFLOP/s of fp8), against 2.94 ms serialised.
- With one warpgroup (64 rows, 64-column tiles, two key buffers) the epilogue and the key loads
  each add about 1 ms to those 1.28 ms instead of hiding behind the products: 3.2 ms whole at 64k.
  Two warpgroups sharing 32-column tiles (128 rows, Q resident, 192-224 KB of shared memory):
  3.3-3.6 ms. Prefetching the column scales a tile early helped the 128-row shape (3.62 -> 3.33)
  and hurt the 64-row one (spills; 3.18 -> 3.83).
- So a Gluon estimate pays only with warp specialisation in the manner of FlashAttention-3: a
  producer warp streaming key chunks through a ring, two consumer warpgroups alternating products
  and epilogues. Not built; ``docs/kernel_notes.md`` ("A sixth session") has the numbers.

Layout (one program per (batch x query head, row tile) of ``BLOCK_R`` strided rows, 4 warps per
64 rows, one program per SM): the row tile's eight fp8 query chunks resident in shared memory,
column tiles of keys (eight chunks each) in ``NUM_BUF`` buffers with one mbarrier each, two
accumulators in registers. It writes each (strided row, key block) log-sum-exp (base 2) to
``lse [B*Hq, n_rows, nk]``; :func:`importance_from_lse` finishes in PyTorch (the second phase, to
check the numbers; the Triton kernel does it in the same program).

    python benchmarks/gluon_estimate.py --lengths 32768,65536   # on the GPU: check + time variants

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


def cdiv(a, b):
    return -(-a // b)


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
def _epilogue(acc, col_scale, c0, m, row_ok, row_last, first_last, row_scale, LSE, lse_row_base, nk,
              CAUSAL: gl.constexpr, S: gl.constexpr, BLOCK_R: gl.constexpr, BLOCK_C: gl.constexpr,
              COLS_PER_BLOCK: gl.constexpr, acc_layout: gl.constexpr):
    """Tile ``[c0, c0 + BLOCK_C)``: each row's log-sum-exp per key block, stored (the Triton
    kernel's epilogue, with the column vectors loaded straight into the accumulator's layout)."""
    KBLOCKS: gl.constexpr = BLOCK_C // COLS_PER_BLOCK
    cols = c0 + gl.arange(0, BLOCK_C, layout=gl.SliceLayout(0, acc_layout))
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
def _next_tile(q_smem, k_bufs, k_bars, t, SK, key_row0, n_cols, acc_layout: gl.constexpr, S: gl.constexpr,
               BLOCK_R: gl.constexpr, BLOCK_C: gl.constexpr, NUM_BUF: gl.constexpr, LOADS: gl.constexpr):
    """Wait for column tile ``t``'s keys, leave its products in flight and start loading its column
    scales (used a tile later: loaded in the epilogue, each tile waited on an L2 round trip)."""
    buf = t % NUM_BUF
    if LOADS:
        mbarrier.wait(k_bars.index(buf), (t // NUM_BUF) & 1)
    else:
        if t < NUM_BUF:
            mbarrier.wait(k_bars.index(buf), 0)
    acc = _issue_tile(q_smem, k_bufs, buf, acc_layout, S, BLOCK_R, BLOCK_C)
    cols = t * BLOCK_C + gl.arange(0, BLOCK_C, layout=gl.SliceLayout(0, acc_layout))
    col_scale = gl.load(SK + key_row0 + cols, mask=cols < n_cols, other=0.0)
    return acc, col_scale


@gluon.jit
def _finish_tile(cur, col_scale, t, total, K_DESC, k_bufs, k_bars, key_row0, n_tiles, m, row_ok, row_last, first_last,
                 row_scale, SK, LSE, lse_row_base, n_cols, nk, CAUSAL: gl.constexpr, S: gl.constexpr,
                 BLOCK_R: gl.constexpr, BLOCK_C: gl.constexpr, BLOCK_D: gl.constexpr, COLS_PER_BLOCK: gl.constexpr,
                 NUM_BUF: gl.constexpr, EPILOGUE: gl.constexpr, LOADS: gl.constexpr, acc_layout: gl.constexpr):
    """Tile ``t``'s products are done: refill its buffer with tile ``t + NUM_BUF``, then its epilogue."""
    if LOADS:
        _load_tile(K_DESC, k_bufs, k_bars, t % NUM_BUF, key_row0 + (t + NUM_BUF) * BLOCK_C, t + NUM_BUF < n_tiles,
                   S, BLOCK_C, BLOCK_D)
    if EPILOGUE:
        _epilogue(cur, col_scale, t * BLOCK_C, m, row_ok, row_last, first_last, row_scale, LSE, lse_row_base,
                  nk, CAUSAL, S, BLOCK_R, BLOCK_C, COLS_PER_BLOCK, acc_layout)
    else:
        total += gl.sum(cur, 1)
    return total


@gluon.jit
def _estimate_phase1_kernel(
    Q_DESC, K_DESC, SQ, SK, LSE, scale_log2,
    Hq, GROUP, Hkv, Lq, Lk, n_rows, n_cols, nk,
    CAUSAL: gl.constexpr, S: gl.constexpr, BLOCK_R: gl.constexpr, BLOCK_C: gl.constexpr,
    BLOCK_D: gl.constexpr, COLS_PER_BLOCK: gl.constexpr, NUM_BUF: gl.constexpr,
    EPILOGUE: gl.constexpr, LOADS: gl.constexpr,
):
    """``EPILOGUE=False`` / ``LOADS=False`` are diagnostics (wrong numbers): no epilogue (the
    products are summed into one row vector) / key tiles loaded only once (the products reread the
    first ``NUM_BUF`` tiles), to time the pipeline's parts."""
    tile = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[BLOCK_R // 16, 1],
                                                         instr_shape=[16, BLOCK_C, 32])
    row_layout: gl.constexpr = gl.SliceLayout(1, acc_layout)

    q_smem = gl.allocate_shared_memory(gl.float8e4nv, [S, BLOCK_R, BLOCK_D], Q_DESC.layout)
    k_bufs = gl.allocate_shared_memory(gl.float8e4nv, [NUM_BUF * S, BLOCK_C, BLOCK_D], K_DESC.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar.index(0), count=1)
    for i in gl.static_range(NUM_BUF):
        mbarrier.init(k_bars.index(i), count=1)

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
    total = gl.zeros([BLOCK_R], gl.float32, row_layout)

    mbarrier.expect(q_bar.index(0), S * BLOCK_R * BLOCK_D)
    for i in gl.static_range(S):
        tma.async_copy_global_to_shared(Q_DESC, [bh * n_rows + tile * BLOCK_R, i * BLOCK_D], q_bar.index(0),
                                        q_smem.index(i))
    for i in gl.static_range(NUM_BUF):
        _load_tile(K_DESC, k_bufs, k_bars, i, key_row0 + i * BLOCK_C, n_tiles > i, S, BLOCK_C, BLOCK_D)
    mbarrier.wait(q_bar.index(0), 0)
    hopper.fence_async_shared()
    # Two accumulators in fixed registers, the loop unrolled by two: handing the tile in flight
    # from one loop-carried variable to another made the compiler copy its registers while its
    # products ran, and ptxas then serialised every product (C7514: "wgmma.mma_async instructions
    # are serialized").
    acc_a, cs_a = _next_tile(q_smem, k_bufs, k_bars, 0, SK, key_row0, n_cols, acc_layout, S, BLOCK_R, BLOCK_C, NUM_BUF, LOADS)
    n_pairs = (n_tiles - 1) // 2
    for p in range(0, n_pairs):
        t = 2 * p
        acc_b, cs_b = _next_tile(q_smem, k_bufs, k_bars, t + 1, SK, key_row0, n_cols, acc_layout, S, BLOCK_R, BLOCK_C, NUM_BUF, LOADS)
        cur = hopper.warpgroup_mma_wait(num_outstanding=S, deps=[acc_a])  # tile t done, t + 1 in flight
        total = _finish_tile(cur, cs_a, t, total, K_DESC, k_bufs, k_bars, key_row0, n_tiles, m, row_ok, row_last,
                             first_last, row_scale, SK, LSE, lse_row_base, n_cols, nk, CAUSAL, S, BLOCK_R, BLOCK_C,
                             BLOCK_D, COLS_PER_BLOCK, NUM_BUF, EPILOGUE, LOADS, acc_layout)
        acc_a, cs_a = _next_tile(q_smem, k_bufs, k_bars, t + 2, SK, key_row0, n_cols, acc_layout, S, BLOCK_R, BLOCK_C, NUM_BUF, LOADS)
        cur = hopper.warpgroup_mma_wait(num_outstanding=S, deps=[acc_b])
        total = _finish_tile(cur, cs_b, t + 1, total, K_DESC, k_bufs, k_bars, key_row0, n_tiles, m, row_ok, row_last,
                             first_last, row_scale, SK, LSE, lse_row_base, n_cols, nk, CAUSAL, S, BLOCK_R, BLOCK_C,
                             BLOCK_D, COLS_PER_BLOCK, NUM_BUF, EPILOGUE, LOADS, acc_layout)
    t = 2 * n_pairs
    if t + 1 < n_tiles:
        acc_b, cs_b = _next_tile(q_smem, k_bufs, k_bars, t + 1, SK, key_row0, n_cols, acc_layout, S, BLOCK_R, BLOCK_C, NUM_BUF, LOADS)
        cur = hopper.warpgroup_mma_wait(num_outstanding=S, deps=[acc_a])
        total = _finish_tile(cur, cs_a, t, total, K_DESC, k_bufs, k_bars, key_row0, n_tiles, m, row_ok, row_last,
                             first_last, row_scale, SK, LSE, lse_row_base, n_cols, nk, CAUSAL, S, BLOCK_R, BLOCK_C,
                             BLOCK_D, COLS_PER_BLOCK, NUM_BUF, EPILOGUE, LOADS, acc_layout)
        cur = hopper.warpgroup_mma_wait(num_outstanding=0, deps=[acc_b])
        total = _finish_tile(cur, cs_b, t + 1, total, K_DESC, k_bufs, k_bars, key_row0, n_tiles, m, row_ok, row_last,
                             first_last, row_scale, SK, LSE, lse_row_base, n_cols, nk, CAUSAL, S, BLOCK_R, BLOCK_C,
                             BLOCK_D, COLS_PER_BLOCK, NUM_BUF, EPILOGUE, LOADS, acc_layout)
    else:
        cur = hopper.warpgroup_mma_wait(num_outstanding=0, deps=[acc_a])
        total = _finish_tile(cur, cs_a, t, total, K_DESC, k_bufs, k_bars, key_row0, n_tiles, m, row_ok, row_last,
                             first_last, row_scale, SK, LSE, lse_row_base, n_cols, nk, CAUSAL, S, BLOCK_R, BLOCK_C,
                             BLOCK_D, COLS_PER_BLOCK, NUM_BUF, EPILOGUE, LOADS, acc_layout)
    if not EPILOGUE:
        gl.store(LSE + lse_row_base + m.to(gl.int64) * nk, total, mask=row_ok)
    mbarrier.invalidate(q_bar.index(0))
    for i in gl.static_range(NUM_BUF):
        mbarrier.invalidate(k_bars.index(i))


def estimate_lse(q, k, *, causal=True, scale=None, stride=8, block_k=128, block_r=64, block_c=64, prepared=None,
                 num_buf=2, epilogue=True, loads=True):
    """First phase: ``lse [B*Hq, n_rows, nk]`` (-inf where not written) from fp8 copies of q, k.
    ``prepared`` (from :func:`prepare`) skips the quantisation and the allocation, to time the
    kernel alone."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    assert D == 128 and stride == 8, "draft: D = 128, stride 8"
    scale = D**-0.5 if scale is None else float(scale)
    if scale < 0:
        q, scale = -q, -scale
    q_desc, k_desc, sq, sk, lse, n_rows, n_cols, nk = prepared or prepare(q, k, stride, block_k, block_r, block_c)
    grid = (cdiv(n_rows, block_r), B * Hq)
    _estimate_phase1_kernel[grid](
        q_desc, k_desc, sq, sk, lse, scale / stride * _LOG2E,
        Hq, Hq // Hkv, Hkv, Lq, Lk, n_rows, n_cols, nk,
        CAUSAL=causal, S=stride, BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_D=D, COLS_PER_BLOCK=block_k // stride,
        NUM_BUF=num_buf, EPILOGUE=epilogue, LOADS=loads, num_warps=block_r // 16,
    )
    return lse


def prepare(q, k, stride=8, block_k=128, block_r=64, block_c=64):
    """The fp8 copies' descriptors, their scales and the ``-inf``-filled output."""
    from psa_kernels.importance import quantize_qk

    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    q8, sq, k8, sk = quantize_qk(q, k, stride)
    n_rows, n_cols, nk = cdiv(Lq, stride), cdiv(Lk, stride), cdiv(Lk, block_k)
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
    q_desc = TensorDescriptor.from_tensor(q8.view(B * Hq * n_rows, stride * D), [block_r, D], layout)
    k_desc = TensorDescriptor.from_tensor(k8.view(B * Hkv * n_cols, stride * D), [block_c, D], layout)
    lse = torch.full((B * Hq, n_rows, nk), float("-inf"), dtype=torch.float32, device=q.device)
    return q_desc, k_desc, sq, sk, lse, n_rows, n_cols, nk


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
        from benchmarks.offline_compile import compile_and_report

        q = torch.randn(1, 28, 4096, 128, dtype=torch.bfloat16)
        k = torch.randn(1, 4, 4096, 128, dtype=torch.bfloat16)
        # (The quantisation's launch is intercepted too, so the estimate may fail after compiling.)
        compile_and_report("gluon", lambda: estimate_lse(q, k), Path("/tmp/gluon_estimate"))
        return 0
    from triton.testing import do_bench

    from psa_kernels.importance import antidiagonal_importance_triton

    from psa_kernels.importance import quantize_qk

    variants = [  # (label, block_r, block_c, num_buf, epilogue, loads); "no ..." are diagnostics
        ("R64 C64 x2", 64, 64, 2, True, True), ("R128 C32 x2", 128, 32, 2, True, True),
        ("R128 C32 x3", 128, 32, 3, True, True),
        ("R64 C64 x1 no loads", 64, 64, 1, True, False),
        ("R128 C64 x1 no loads", 128, 64, 1, True, False),
        ("R64 C64 x2 no epilogue", 64, 64, 2, False, True),
    ]
    bench = lambda f: do_bench(f, warmup=10, rep=50, return_mode="median")  # noqa: E731
    for L in (int(x) for x in args.lengths.split(",")):
        q = torch.randn(1, 28, L, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 4, L, 128, device="cuda", dtype=torch.bfloat16)
        want = antidiagonal_importance_triton(q, k, causal=True, precision="fp8")
        t_triton = bench(lambda: antidiagonal_importance_triton(q, k, causal=True, precision="fp8"))
        t_quant = bench(lambda: quantize_qk(q, k, 8))
        print(f"L {L}: triton (quantise + both phases) {t_triton:.3f} ms, quantise {t_quant:.3f}", flush=True)
        for label, block_r, block_c, num_buf, epilogue, loads in variants:
            kw = dict(block_r=block_r, block_c=block_c, num_buf=num_buf, epilogue=epilogue, loads=loads)
            prepared = prepare(q, k, block_r=block_r, block_c=block_c)
            if epilogue and loads:
                got = importance_from_lse(estimate_lse(q, k, **kw), 1, 28, L)
                err = f"{((got - want).norm() / want.norm()).item():.2e}"
            else:
                err = "-"
            t_kernel = bench(lambda: estimate_lse(q, k, prepared=prepared, **kw))
            print(f"  {label:24s} phase-1 kernel {t_kernel:.3f} ms  rel err {err}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
