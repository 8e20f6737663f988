"""EXPERIMENT (not used by the package): causal attention with every pair at level 1, written in
Gluon with warp specialisation for Hopper, to see whether issue 14's "every pair at level 1 within
1.10x of SDPA" is in reach of a kernel we write (the Triton PSA kernel is 1.18-1.22x; a plain
causal flash kernel in Triton 3.6 1.23-1.37x; Triton 3.6's own warp specialisation fails or does
nothing on these loops, ``docs/kernel_notes.md``).

The form is FlashAttention-3's: per program a tile of 128 query rows of one head, a producer warp
streaming the K and V tiles of its kv head through a ring of shared-memory stages (TMA, "ready"
and "empty" mbarriers), two consumer warpgroups of 64 rows each (queries in shared memory, the
accumulator in registers), optionally in ping-pong on the tensor cores (a "turn" mbarrier each:
one warpgroup's softmax runs under the other's products). Programs run longest tile first, one
chunk of kv heads at a time (the PSA kernel's order). Limits: bf16, head dim 128, Lq = Lk a
multiple of 128, causal.

    python benchmarks/gluon_attention.py --lengths 16384,32768,65536   # on the GPU: check, then time
    python benchmarks/gluon_attention.py --offline                      # compile for sm_90 without a GPU
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

from psa_kernels.attention_hopper import HALF, ROWS, _LOG2E, _kv_ring, _program_tile, wgmma_layout  # noqa: E402,F401


@gluon.jit
def _producer(Q_DESC, K_DESC, V_DESC, OUT, qk_scale, Hq, GROUP, KV_CHUNK, L, n_tiles, q_smem, k_ring, v_ring, q_bar,
              k_ready, v_ready, empty, turn, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, NSTAGE: gl.constexpr,
              MODE: gl.constexpr):
    tile, bh, bk = _program_tile(Hq, GROUP, KV_CHUNK, n_tiles)
    q_row = bh * L + tile * 2 * HALF
    kv_row = bk * L
    mbarrier.expect(q_bar.index(0), 2 * HALF * HEAD_D * 2)
    tma.async_copy_global_to_shared(Q_DESC, [q_row, 0], q_bar.index(0), q_smem.index(0))
    tma.async_copy_global_to_shared(Q_DESC, [q_row + HALF, 0], q_bar.index(0), q_smem.index(1))
    n_kv = gl.cdiv((tile + 1) * 2 * HALF, BLOCK_N)
    for j in range(n_kv):
        s = j % NSTAGE
        # A fresh mbarrier counts as having completed the phase before phase 0: the first round's
        # waits (parity 1) pass at once.
        mbarrier.wait(empty.index(s), ((j // NSTAGE) & 1) ^ 1)
        mbarrier.expect(k_ready.index(s), BLOCK_N * HEAD_D * 2)
        tma.async_copy_global_to_shared(K_DESC, [kv_row + j * BLOCK_N, 0], k_ready.index(s), k_ring.index(s))
        mbarrier.expect(v_ready.index(s), BLOCK_N * HEAD_D * 2)
        tma.async_copy_global_to_shared(V_DESC, [kv_row + j * BLOCK_N, 0], v_ready.index(s), v_ring.index(s))


@gluon.jit
def _masked(qk, j, rows, first_masked, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
    """Tile ``j``'s logits with the causal mask where the tile reaches past the first row."""
    if j >= first_masked:
        cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        qk = gl.where(cols[None, :] <= rows[:, None], qk, float("-inf"))
    return qk


@gluon.jit
def _softmax_step(qk, m_i, l_i, qk_scale):
    """Online softmax over one tile (base 2, the scale folded into the exponent): the tile's
    probabilities, the new row max and sum, and the factor that rescales what came before."""
    m_new = gl.maximum(m_i, gl.max(qk, 1))
    m_scaled = m_new * qk_scale
    alpha = gl.exp2(m_i * qk_scale - m_scaled)
    p = gl.exp2(qk * qk_scale - m_scaled[:, None])
    return p, m_new, l_i * alpha + gl.sum(p, 1), alpha


@gluon.jit
def _pass_tiles(k_ready, v_ready, empty, start, stop, NSTAGE: gl.constexpr):
    """Tiles only the other warpgroup's rows see: release their stages unread."""
    for j in range(start, stop):
        s = j % NSTAGE
        mbarrier.wait(k_ready.index(s), (j // NSTAGE) & 1)
        mbarrier.wait(v_ready.index(s), (j // NSTAGE) & 1)
        mbarrier.arrive(empty.index(s), count=1)


@gluon.jit
def _consumer(Q_DESC, K_DESC, V_DESC, OUT, qk_scale, Hq, GROUP, KV_CHUNK, L, n_tiles, q_smem, k_ring, v_ring, q_bar,
              k_ready, v_ready, empty, turn, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, NSTAGE: gl.constexpr,
              MODE: gl.constexpr, W: gl.constexpr):
    # MODE 0: each tile's products, then its softmax; 1: the same with the warpgroups in ping-pong
    # on the tensor cores; 2: tile j+1's QK product and tile j's PV product in flight while tile
    # j+1's softmax runs (FlashAttention-3's intra-warpgroup overlap).
    s_layout: gl.constexpr = wgmma_layout(BLOCK_N)
    o_layout: gl.constexpr = wgmma_layout(HEAD_D)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    tile, bh, bk = _program_tile(Hq, GROUP, KV_CHUNK, n_tiles)
    row0 = tile * 2 * HALF + W * HALF  # this warpgroup's first query row
    rows = row0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, s_layout))
    # Key tiles this warpgroup's rows see (the other's last tile may lie past them).
    n_kv = gl.cdiv((tile + 1) * 2 * HALF, BLOCK_N)
    n_mine = gl.cdiv(row0 + HALF, BLOCK_N)
    first_masked = row0 // BLOCK_N  # the first tile reaching past the warpgroup's first row
    l_i = gl.zeros([HALF], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([HALF, HEAD_D], gl.float32, o_layout)
    zeros = gl.zeros([HALF, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(q_bar.index(0), 0)
    q = q_smem.index(W)
    if MODE == 2:
        mbarrier.wait(k_ready.index(0), 0)
        qk = hopper.warpgroup_mma(q, k_ring.index(0).permute((1, 0)), zeros, use_acc=False)
        qk = _masked(qk, 0, rows, first_masked, BLOCK_N, s_layout)
        m_i = gl.max(qk, 1)
        p = gl.exp2(qk * qk_scale - (m_i * qk_scale)[:, None])
        l_i = gl.sum(p, 1)
        for j in range(1, n_mine):
            s = j % NSTAGE
            prev = (j - 1) % NSTAGE
            mbarrier.wait(k_ready.index(s), (j // NSTAGE) & 1)
            qk = hopper.warpgroup_mma(q, k_ring.index(s).permute((1, 0)), zeros, use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(prev), ((j - 1) // NSTAGE) & 1)
            acc = hopper.warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_layout), v_ring.index(prev), acc,
                                       is_async=True)
            qk = hopper.warpgroup_mma_wait(num_outstanding=1, deps=[qk])
            qk = _masked(qk, j, rows, first_masked, BLOCK_N, s_layout)
            p, m_i, l_i, alpha = _softmax_step(qk, m_i, l_i, qk_scale)
            acc = hopper.warpgroup_mma_wait(num_outstanding=0, deps=[acc])
            mbarrier.arrive(empty.index(prev), count=1)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        last = (n_mine - 1) % NSTAGE
        mbarrier.wait(v_ready.index(last), ((n_mine - 1) // NSTAGE) & 1)
        acc = hopper.warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_layout), v_ring.index(last), acc)
        mbarrier.arrive(empty.index(last), count=1)
        _pass_tiles(k_ready, v_ready, empty, n_mine, n_kv, NSTAGE)
    else:
        m_i = gl.full([HALF], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        for j in range(n_mine):
            s = j % NSTAGE
            phase = (j // NSTAGE) & 1
            if MODE == 1:  # warpgroup 0 goes first (a fresh barrier passes a wait on parity 1)
                mbarrier.wait(turn.index(W), (j & 1) ^ (1 - W))
            mbarrier.wait(k_ready.index(s), phase)
            qk = hopper.warpgroup_mma(q, k_ring.index(s).permute((1, 0)), zeros, use_acc=False, is_async=True)
            if MODE == 1:
                mbarrier.arrive(turn.index(1 - W), count=1)
            qk = hopper.warpgroup_mma_wait(num_outstanding=0, deps=[qk])
            qk = _masked(qk, j, rows, first_masked, BLOCK_N, s_layout)
            p, m_i, l_i, alpha = _softmax_step(qk, m_i, l_i, qk_scale)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            mbarrier.wait(v_ready.index(s), phase)
            acc = hopper.warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_layout), v_ring.index(s), acc,
                                       is_async=True)
            acc = hopper.warpgroup_mma_wait(num_outstanding=0, deps=[acc])
            mbarrier.arrive(empty.index(s), count=1)
        if MODE == 1:  # keep the turns alternating over the other warpgroup's extra tiles
            for j in range(n_mine, n_kv):
                mbarrier.wait(turn.index(W), (j & 1) ^ (1 - W))
                mbarrier.arrive(turn.index(1 - W), count=1)
        _pass_tiles(k_ready, v_ready, empty, n_mine, n_kv, NSTAGE)
    out = acc / gl.convert_layout(l_i, row_o)[:, None]
    r = row0 + gl.arange(0, HALF, layout=row_o)
    d = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, o_layout))
    gl.store(OUT + (bh * L + r).to(gl.int64)[:, None] * HEAD_D + d[None, :], out.to(gl.bfloat16))


@gluon.jit
def _attention_kernel(Q_DESC, K_DESC, V_DESC, OUT, qk_scale, Hq, GROUP, KV_CHUNK, L, n_tiles,
                      BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, NSTAGE: gl.constexpr, MODE: gl.constexpr,
                      CONSUMER_REGS: gl.constexpr):
    q_smem, k_ring, v_ring, q_bar, k_ready, v_ready, empty, turn = _kv_ring(Q_DESC, K_DESC, V_DESC, BLOCK_N, NSTAGE)
    # (The argument tuples are written out: a tuple built in the kernel would lose the constexprs.)
    gl.warp_specialize([
        (_consumer, (Q_DESC, K_DESC, V_DESC, OUT, qk_scale, Hq, GROUP, KV_CHUNK, L, n_tiles, q_smem, k_ring, v_ring,
                     q_bar, k_ready, v_ready, empty, turn, BLOCK_N, HEAD_D, NSTAGE, MODE, 0)),
        (_consumer, (Q_DESC, K_DESC, V_DESC, OUT, qk_scale, Hq, GROUP, KV_CHUNK, L, n_tiles, q_smem, k_ring, v_ring,
                     q_bar, k_ready, v_ready, empty, turn, BLOCK_N, HEAD_D, NSTAGE, MODE, 1)),
        (_producer, (Q_DESC, K_DESC, V_DESC, OUT, qk_scale, Hq, GROUP, KV_CHUNK, L, n_tiles, q_smem, k_ring, v_ring,
                     q_bar, k_ready, v_ready, empty, turn, BLOCK_N, HEAD_D, NSTAGE, MODE)),
    ], [4, 1], [CONSUMER_REGS, 40])


def attention(q, k, v, *, block_n=128, nstage=2, mode=0, kv_chunk=None, consumer_regs=232, maxnreg=168):
    """Causal attention, ``q [B, Hq, L, 128]``, ``k, v [B, Hkv, L, 128]`` bf16, ``L % 128 == 0``."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    assert D == 128 and L % 128 == 0 and q.dtype == torch.bfloat16 and k.shape[2] == L, "experiment's limits"
    q, k, v = (t.contiguous() for t in (q, k, v))
    if kv_chunk is None:
        from psa_kernels.attention import kv_chunk_for

        kv_chunk = kv_chunk_for(B * Hkv, L * D * k.element_size()) if q.is_cuda else B * Hkv
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    q_desc = TensorDescriptor.from_tensor(q.view(B * Hq * L, D), [ROWS, D], layout)
    k_desc = TensorDescriptor.from_tensor(k.view(B * Hkv * L, D), [block_n, D], layout)
    v_desc = TensorDescriptor.from_tensor(v.view(B * Hkv * L, D), [block_n, D], layout)
    out = torch.empty_like(q)
    n_tiles = L // (2 * ROWS)
    _attention_kernel[(B * Hq * n_tiles,)](
        q_desc, k_desc, v_desc, out, D**-0.5 * _LOG2E, Hq, Hq // Hkv, kv_chunk, L, n_tiles,
        BLOCK_N=block_n, HEAD_D=D, NSTAGE=nstage, MODE=mode, CONSUMER_REGS=consumer_regs,
        num_warps=4, maxnreg=maxnreg,
    )
    return out


VARIANTS = [  # (label, block_n, stages, mode): shared memory 32 KB of queries + stages x 2 x block_n x 256 B
    ("N128 s2", 128, 2, 0),
    ("N128 s2 ping-pong", 128, 2, 1),
    ("N128 s2 overlap", 128, 2, 2),
    ("N64 s4 ping-pong", 64, 4, 1),
    ("N64 s4 overlap", 64, 4, 2),
    ("N128 s3 ping-pong", 128, 3, 1),
    ("N128 s3 overlap", 128, 3, 2),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="16384,32768,65536")
    parser.add_argument("--offline", action="store_true", help="compile every variant for sm_90 without a GPU")
    parser.add_argument("--variants", default="", help="comma-separated indices into VARIANTS (default: all)")
    args = parser.parse_args(argv)
    variants = [VARIANTS[int(i)] for i in args.variants.split(",")] if args.variants else VARIANTS
    if args.offline:
        from benchmarks.offline_compile import compile_and_report

        q = torch.randn(1, 28, 4096, 128, dtype=torch.bfloat16)
        k, v = (torch.randn(1, 4, 4096, 128, dtype=torch.bfloat16) for _ in range(2))
        for label, block_n, nstage, mode in variants:
            compile_and_report(label, lambda block_n=block_n, nstage=nstage, mode=mode: attention(
                q, k, v, block_n=block_n, nstage=nstage, mode=mode), Path("/tmp/gluon_attn"))
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("gluon_attention.py runs Gluon kernels for Hopper: run it on a machine with CUDA "
                         "(or compile them with --offline)")
    import torch.nn.functional as F
    from triton.testing import do_bench

    import psa_kernels
    from psa_kernels import LevelMap

    def bench(f):
        return do_bench(f, warmup=10, rep=50, return_mode="median")

    for B, Hq, Hkv, L in ((1, 28, 4, 1024), (2, 14, 2, 3072), (1, 7, 1, 4096)):  # correctness first
        q = torch.randn(B, Hq, L, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, Hkv, L, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
        for label, block_n, nstage, mode in variants:
            out = attention(q, k, v, block_n=block_n, nstage=nstage, mode=mode)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            print(f"check B {B} heads {Hq}/{Hkv} L {L} {label}: rel err {err:.1e} nan {bool(out.isnan().any())} "
                  f"{'OK' if err < 1e-2 else 'MISMATCH'}", flush=True)
    for L in (int(x) for x in args.lengths.split(",")):
        q = torch.randn(1, 28, L, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 4, L, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        layout = LevelMap.from_dense(torch.ones(1, 4, L // 128, L // 128, dtype=torch.int8, device="cuda"),
                                     block_q=128, block_k=128, q_len=L, k_len=L, causal=True)
        sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        psa = bench(lambda: psa_kernels.psa_attention(q, k, v, layout, causal=True))
        flops = 4 * 28 * 128 * L * L / 2
        print(f"L {L}: SDPA {sdpa:.3f} ms ({flops / sdpa / 1e9:.0f} TFLOP/s), PSA Triton all level 1 {psa:.3f} ms "
              f"({psa / sdpa:.3f}x)", flush=True)
        for label, block_n, nstage, mode in variants:
            t = bench(lambda b=block_n, n=nstage, m=mode: attention(q, k, v, block_n=b, nstage=n, mode=m))
            print(f"  gluon {label:20s} {t:.3f} ms ({t / sdpa:.3f}x SDPA, {flops / t / 1e9:.0f} TFLOP/s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
