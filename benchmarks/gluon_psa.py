"""EXPERIMENT (not used by the package; written and compiled offline on 2026-12-03, not yet run on a
GPU): the PSA forward in Gluon for Hopper, in the form that ran dense causal attention at 0.950x
SDPA at 16k and 1.066x at 64k (``benchmarks/gluon_attention.py``), reading a :class:`LevelMap`.

A program owns one 128-row query block of one head: a producer warp walks the block's four level
lists in the layout's order (``IDX``, ``LCNT``, ``PLAN``: per level the whole blocks first) and
fills a ring of 128-key stages by TMA, each stage one level-1 block or two level-2, four level-4,
eight level-8 blocks (one box each, at a row offset of the stage), so every QK and PV product is
N = 128 / K = 128 whatever the level. A level's last stage is filled up with repeats of its last
block, masked out. Two consumer warpgroups (64 rows each, 232 registers) take turns on the tensor
cores (ping-pong). Stages of whole blocks run unmasked (one FMA per logit, the level's log2 P as a
constant); a stage with a partial block (the causal diagonal, padding, the tail) reads each
column's count and last position, as the Triton kernel's masked tiles do. Rows with no visible
key write 0. Limits: bf16/fp16, head dim <= 128, block_q = block_k = 128.

    python benchmarks/gluon_psa.py --check                        # on the GPU: against the Triton kernel
    python benchmarks/gluon_psa.py --lengths 16384,32768,65536    # on the GPU: time beside it and SDPA
    python benchmarks/gluon_psa.py --offline                      # compile for sm_90 without a GPU
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

from benchmarks.gluon_attention import HALF, ROWS, _LOG2E, _kv_ring, _program  # noqa: E402

KEYS = gl.constexpr(128)  # keys (level 1) or pooled keys per stage; also block_q = block_k


@gluon.jit
def _block(Hq, Hm, GROUP, KV_CHUNK, nq):
    """This program's (query block, batch, batch x head, batch x kv head, layout row head)."""
    qb, b, h, bk = _program(Hq, GROUP, KV_CHUNK, nq)
    return qb, b, b * Hq + h, bk, h // (Hq // Hm)


@gluon.jit
def _fill_level(K_DESC, V_DESC, k_ring, v_ring, k_ready, v_ready, empty, idx, n_blocks, row0, step,
                P: gl.constexpr, NSTAGE: gl.constexpr):
    """The producer's stages of one level: ``P`` blocks of ``128 / P`` keys per stage, from the
    level's list ``idx``; key block ``j`` is rows ``row0 + j * 128 / P`` of the descriptors."""
    KPB: gl.constexpr = KEYS // P
    for t in range(gl.cdiv(n_blocks, P)):
        s = step % NSTAGE
        # A fresh mbarrier counts as having completed the phase before phase 0.
        mbarrier.wait(empty.index(s), ((step // NSTAGE) & 1) ^ 1)
        mbarrier.expect(k_ready.index(s), KEYS * K_DESC.block_type.shape[1] * 2)
        mbarrier.expect(v_ready.index(s), KEYS * V_DESC.block_type.shape[1] * 2)
        for i in gl.static_range(P):
            blk = gl.load(idx + gl.minimum(t * P + i, n_blocks - 1)).to(gl.int32)  # repeats fill the last stage
            row = row0 + blk * KPB
            tma.async_copy_global_to_shared(K_DESC, [row, 0], k_ready.index(s), k_ring.index(s).slice(i * KPB, KPB))
            tma.async_copy_global_to_shared(V_DESC, [row, 0], v_ready.index(s), v_ring.index(s).slice(i * KPB, KPB))
        step += 1
    return step


@gluon.jit
def _producer(Q_DESC, K1, V1, K2, V2, K4, V4, K8, V8, IDX, LCNT, PLAN, PCNT, PLAST, PAD, OUT, qk_scale,
              Hq, Hm, GROUP, KV_CHUNK, Lq, Lk, nq, nk, total, base2, base4, base8,
              q_smem, k_ring, v_ring, q_bar, k_ready, v_ready, empty, turn,
              CAUSAL: gl.constexpr, HAS_PAD: gl.constexpr, HEAD_DIM: gl.constexpr, NSTAGE: gl.constexpr):
    qb, b, bh, bk, hm = _block(Hq, Hm, GROUP, KV_CHUNK, nq)
    mbarrier.expect(q_bar.index(0), 2 * HALF * Q_DESC.block_type.shape[1] * 2)
    tma.async_copy_global_to_shared(Q_DESC, [bh * Lq + qb * 2 * HALF, 0], q_bar.index(0), q_smem.index(0))
    tma.async_copy_global_to_shared(Q_DESC, [bh * Lq + qb * 2 * HALF + HALF, 0], q_bar.index(0), q_smem.index(1))
    row = (b * Hm + hm) * nq + qb
    idx = IDX + row.to(gl.int64) * nk
    step = 0
    step = _fill_level(K1, V1, k_ring, v_ring, k_ready, v_ready, empty, idx, gl.load(PLAN + row * 8),
                       bk * Lk, step, 1, NSTAGE)
    idx += gl.load(LCNT + row * 4)
    step = _fill_level(K2, V2, k_ring, v_ring, k_ready, v_ready, empty, idx, gl.load(PLAN + row * 8 + 1),
                       bk * total + base2, step, 2, NSTAGE)
    idx += gl.load(LCNT + row * 4 + 1)
    step = _fill_level(K4, V4, k_ring, v_ring, k_ready, v_ready, empty, idx, gl.load(PLAN + row * 8 + 2),
                       bk * total + base4, step, 4, NSTAGE)
    idx += gl.load(LCNT + row * 4 + 2)
    step = _fill_level(K8, V8, k_ring, v_ring, k_ready, v_ready, empty, idx, gl.load(PLAN + row * 8 + 3),
                       bk * total + base8, step, 8, NSTAGE)


@gluon.jit
def _consume_level(q, k_ring, v_ring, k_ready, v_ready, empty, turn, acc, m_i, l_i, step, idx, n_blocks, n_whole,
                   q_pos, qk_scale, PCNT, PLAST, PAD, b, Lk, base, n_rows,
                   P: gl.constexpr, CAUSAL: gl.constexpr, HAS_PAD: gl.constexpr, NSTAGE: gl.constexpr,
                   W: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr):
    """One level's stages (as :func:`_fill_level` filled them): online softmax over each."""
    KPB: gl.constexpr = KEYS // P
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    bias = gl.log2(P * 1.0)
    zeros = gl.zeros([HALF, KEYS], gl.float32, s_layout)
    for t in range(gl.cdiv(n_blocks, P)):
        s = step % NSTAGE
        phase = (step // NSTAGE) & 1
        mbarrier.wait(turn.index(W), (step & 1) ^ (1 - W))  # warpgroup 0 goes first
        mbarrier.wait(k_ready.index(s), phase)
        qk = hopper.warpgroup_mma(q, k_ring.index(s).permute((1, 0)), zeros, use_acc=False, is_async=True)
        mbarrier.arrive(turn.index(1 - W), count=1)
        qk = hopper.warpgroup_mma_wait(num_outstanding=0, deps=[qk])
        if (t + 1) * P <= n_whole:
            # Whole blocks: every key visible, a pooled key stands for P tokens (+log2 P); the row
            # max of the raw products scales to that of the logits (qk_scale > 0): one FMA a logit.
            m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale + bias)
            m_safe = m_new
            p = gl.exp2(qk * qk_scale - (m_new - bias)[:, None])
        else:
            c = gl.arange(0, KEYS, layout=col_layout)
            slot = t * P + c // KPB
            blk = gl.load(idx + gl.minimum(slot, n_blocks - 1)).to(gl.int32)
            key = blk * KPB + c % KPB  # key (P = 1) or group (P > 1) of this level
            ok = (slot < n_blocks) & (key < n_rows)
            logits = qk * qk_scale
            if P == 1:
                if HAS_PAD:
                    ok = ok & (gl.load(PAD + b * Lk + key, mask=ok, other=0) != 0)
                last = key
            else:
                cnt = gl.load(PCNT + base + key, mask=ok, other=0)
                last = gl.load(PLAST + base + key, mask=ok, other=0)
                ok = ok & (cnt > 0)
                logits += gl.log2(gl.maximum(cnt, 1).to(gl.float32))[None, :]
            visible = ok[None, :]
            if CAUSAL:
                visible = visible & (last[None, :] < (q_pos + 1)[:, None])
            logits = gl.where(visible, logits, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(logits, 1))
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
            p = gl.exp2(logits - m_safe[:, None])
        alpha = gl.exp2(m_i - m_safe)
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        mbarrier.wait(v_ready.index(s), phase)
        acc = hopper.warpgroup_mma(gl.convert_layout(p.to(v_ring.dtype), p_layout), v_ring.index(s), acc,
                                   is_async=True)
        acc = hopper.warpgroup_mma_wait(num_outstanding=0, deps=[acc])
        mbarrier.arrive(empty.index(s), count=1)
        step += 1
    return acc, m_i, l_i, step


@gluon.jit
def _consumer(Q_DESC, K1, V1, K2, V2, K4, V4, K8, V8, IDX, LCNT, PLAN, PCNT, PLAST, PAD, OUT, qk_scale,
              Hq, Hm, GROUP, KV_CHUNK, Lq, Lk, nq, nk, total, base2, base4, base8,
              q_smem, k_ring, v_ring, q_bar, k_ready, v_ready, empty, turn,
              CAUSAL: gl.constexpr, HAS_PAD: gl.constexpr, HEAD_DIM: gl.constexpr, NSTAGE: gl.constexpr,
              W: gl.constexpr):
    D: gl.constexpr = Q_DESC.block_type.shape[1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, KEYS, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, D, 16])
    qb, b, bh, bk, hm = _block(Hq, Hm, GROUP, KV_CHUNK, nq)
    row = (b * Hm + hm) * nq + qb
    idx = IDX + row.to(gl.int64) * nk
    r0 = qb * 2 * HALF + W * HALF
    q_pos = r0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, s_layout)) + (Lk - Lq)
    m_i = gl.full([HALF], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([HALF], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([HALF, D], gl.float32, o_layout)
    mbarrier.wait(q_bar.index(0), 0)
    q = q_smem.index(W)
    pcnt = PCNT + b * total
    plast = PLAST + b * total
    step = 0
    acc, m_i, l_i, step = _consume_level(q, k_ring, v_ring, k_ready, v_ready, empty, turn, acc, m_i, l_i, step, idx,
                                         gl.load(PLAN + row * 8), gl.load(PLAN + row * 8 + 4), q_pos, qk_scale,
                                         pcnt, plast, PAD, b, Lk, 0, Lk,
                                         1, CAUSAL, HAS_PAD, NSTAGE, W, s_layout, o_layout)
    idx += gl.load(LCNT + row * 4)
    acc, m_i, l_i, step = _consume_level(q, k_ring, v_ring, k_ready, v_ready, empty, turn, acc, m_i, l_i, step, idx,
                                         gl.load(PLAN + row * 8 + 1), gl.load(PLAN + row * 8 + 5), q_pos, qk_scale,
                                         pcnt, plast, PAD, b, Lk, base2, (Lk + 1) // 2,
                                         2, CAUSAL, HAS_PAD, NSTAGE, W, s_layout, o_layout)
    idx += gl.load(LCNT + row * 4 + 1)
    acc, m_i, l_i, step = _consume_level(q, k_ring, v_ring, k_ready, v_ready, empty, turn, acc, m_i, l_i, step, idx,
                                         gl.load(PLAN + row * 8 + 2), gl.load(PLAN + row * 8 + 6), q_pos, qk_scale,
                                         pcnt, plast, PAD, b, Lk, base4, (Lk + 3) // 4,
                                         4, CAUSAL, HAS_PAD, NSTAGE, W, s_layout, o_layout)
    idx += gl.load(LCNT + row * 4 + 2)
    acc, m_i, l_i, step = _consume_level(q, k_ring, v_ring, k_ready, v_ready, empty, turn, acc, m_i, l_i, step, idx,
                                         gl.load(PLAN + row * 8 + 3), gl.load(PLAN + row * 8 + 7), q_pos, qk_scale,
                                         pcnt, plast, PAD, b, Lk, base8, (Lk + 7) // 8,
                                         8, CAUSAL, HAS_PAD, NSTAGE, W, s_layout, o_layout)
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    out = gl.where(l_o[:, None] > 0, acc / gl.maximum(l_o, 1e-30)[:, None], 0.0)
    r = r0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, o_layout))
    d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    gl.store(OUT + (bh * Lq + r).to(gl.int64)[:, None] * HEAD_DIM + d[None, :], out.to(OUT.dtype.element_ty),
             mask=(r < Lq)[:, None] & (d < HEAD_DIM)[None, :])


@gluon.jit
def _psa_kernel(Q_DESC, K1, V1, K2, V2, K4, V4, K8, V8, IDX, LCNT, PLAN, PCNT, PLAST, PAD, OUT, qk_scale,
                Hq, Hm, GROUP, KV_CHUNK, Lq, Lk, nq, nk, total, base2, base4, base8,
                CAUSAL: gl.constexpr, HAS_PAD: gl.constexpr, HEAD_DIM: gl.constexpr, NSTAGE: gl.constexpr,
                CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
    q_smem, k_ring, v_ring, q_bar, k_ready, v_ready, empty, turn = _kv_ring(Q_DESC, K1, V1, KEYS, NSTAGE)
    # (The argument tuples are written out: a tuple built in the kernel would lose the constexprs.)
    gl.warp_specialize([
        (_consumer, (Q_DESC, K1, V1, K2, V2, K4, V4, K8, V8, IDX, LCNT, PLAN, PCNT, PLAST, PAD, OUT, qk_scale,
                     Hq, Hm, GROUP, KV_CHUNK, Lq, Lk, nq, nk, total, base2, base4, base8,
                     q_smem, k_ring, v_ring, q_bar, k_ready, v_ready, empty, turn, CAUSAL, HAS_PAD, HEAD_DIM,
                     NSTAGE, 0)),
        (_consumer, (Q_DESC, K1, V1, K2, V2, K4, V4, K8, V8, IDX, LCNT, PLAN, PCNT, PLAST, PAD, OUT, qk_scale,
                     Hq, Hm, GROUP, KV_CHUNK, Lq, Lk, nq, nk, total, base2, base4, base8,
                     q_smem, k_ring, v_ring, q_bar, k_ready, v_ready, empty, turn, CAUSAL, HAS_PAD, HEAD_DIM,
                     NSTAGE, 1)),
        (_producer, (Q_DESC, K1, V1, K2, V2, K4, V4, K8, V8, IDX, LCNT, PLAN, PCNT, PLAST, PAD, OUT, qk_scale,
                     Hq, Hm, GROUP, KV_CHUNK, Lq, Lk, nq, nk, total, base2, base4, base8,
                     q_smem, k_ring, v_ring, q_bar, k_ready, v_ready, empty, turn, CAUSAL, HAS_PAD, HEAD_DIM,
                     NSTAGE)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def psa_attention(q, k, v, layout, *, causal=True, scale=None, key_padding_mask=None, nstage=2, kv_chunk=None,
                  consumer_regs=232, producer_regs=40, maxnreg=168):
    """PSA forward with a :class:`LevelMap` planned for this call (``block_q = block_k = 128``)."""
    from psa_kernels.attention import kv_chunk_for
    from psa_kernels.pyramid import build_device_pyramid

    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    assert q.dtype in (torch.bfloat16, torch.float16) and D <= 128 and D % 8 == 0, "experiment's limits"
    assert layout.block_q == 128 and layout.block_k == 128, "experiment's limits: 128-token blocks"
    scale = D**-0.5 if scale is None else float(scale)
    if scale < 0:
        q, scale = -q, -scale
    q, k, v = (t.contiguous() for t in (q, k, v))
    pyr = build_device_pyramid(k, v, key_padding_mask)
    total = pyr.keys.shape[2]
    dtype_bits = 16
    layout_smem = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=dtype_bits, rank=2)
    box_d = 128  # head dims below read zeros past D (the descriptors' own bounds)

    def desc(t, rows, n):
        return TensorDescriptor(t, shape=[rows, D], strides=[D, 1], block_shape=[n, box_d], layout=layout_smem)

    q_desc = desc(q.view(B * Hq * Lq, D), B * Hq * Lq, ROWS)
    level1 = [desc(t.view(B * Hkv * Lk, D), B * Hkv * Lk, 128) for t in (k, v)]
    pooled = [desc(t.view(B * Hkv * total, D), B * Hkv * total, n) for n in (64, 32, 16)
              for t in (pyr.keys, pyr.values)]
    out = torch.empty_like(q)
    nq, nk = layout.indices.shape[2:]
    Hm = layout.indices.shape[1]
    pad = key_padding_mask.view(torch.int8) if key_padding_mask is not None else pyr.counts
    if kv_chunk is None:
        kv_chunk = kv_chunk_for(B * Hkv, Lk * D * k.element_size()) if q.is_cuda else B * Hkv
    _psa_kernel[(B * Hq * nq,)](
        q_desc, *level1, *pooled, layout.indices, layout.counts, layout.plan, pyr.counts, pyr.last, pad, out,
        scale * _LOG2E, Hq, Hm, Hq // Hkv, kv_chunk, Lq, Lk, nq, nk, total, pyr.base[2], pyr.base[4], pyr.base[8],
        CAUSAL=causal, HAS_PAD=key_padding_mask is not None, HEAD_DIM=D, NSTAGE=nstage,
        CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs, num_warps=4, maxnreg=maxnreg,
    )
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="16384,32768,65536")
    parser.add_argument("--check", action="store_true", help="compare with the Triton kernel on awkward cases first")
    parser.add_argument("--offline", action="store_true", help="compile for sm_90 without a GPU")
    parser.add_argument("--regs", default="232/40,240/24",
                        help="consumer/producer register splits to time (offline: 128 and 56 bytes of spills)")
    parser.add_argument("--stages", default="2", help="ring stages to time (3 fills 224 KB of shared memory)")
    args = parser.parse_args(argv)
    splits = [tuple(int(x) for x in split.split("/")) for split in args.regs.split(",")]
    stages = [int(x) for x in args.stages.split(",")]
    from psa_kernels import LevelMap

    if args.offline:
        from benchmarks.offline_compile import report, sm90_compiler

        q = torch.randn(1, 28, 4096, 128, dtype=torch.bfloat16)
        k, v = (torch.randn(1, 4, 4096, 128, dtype=torch.bfloat16) for _ in range(2))
        dense = torch.randint(0, 4, (1, 28, 32, 32), dtype=torch.int8)
        layout = LevelMap.from_dense(torch.tensor([0, 1, 2, 4, 8], dtype=torch.int8)[dense.long()], block_q=128,
                                     block_k=128, q_len=4096, k_len=4096, causal=True)
        for label, mask, nstage in [(f"causal {n} stages", None, n) for n in stages] + [
                ("causal padded", torch.ones(1, 4096, dtype=torch.bool), stages[0])]:
            with sm90_compiler() as compiled:
                try:
                    psa_attention(q, k, v, layout, key_padding_mask=mask, nstage=nstage)
                except Exception as err:  # noqa: BLE001
                    print(f"{label}: {type(err).__name__}: {str(err)[:3000]}")
                for name, kernel in compiled:
                    if kernel is not None and name == "_psa_kernel":
                        report(f"{label.replace(' ', '_')}:{name}", kernel, Path("/tmp/gluon_psa"))
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("gluon_psa.py runs Gluon kernels for Hopper: run it on a machine with CUDA "
                         "(or compile them with --offline)")
    import torch.nn.functional as F
    from triton.testing import do_bench

    import psa_kernels
    from psa_vlm.compare import video_like_qkv
    from psa_vlm.config import load_preset

    def bench(f):
        return do_bench(f, warmup=10, rep=50, return_mode="median")

    if args.check:
        levels = torch.tensor([0, 1, 2, 4, 8], dtype=torch.int8, device="cuda")
        cases = [  # (B, Hq, Hkv, Lq, Lk, D, pad of the second sample)
            (1, 28, 4, 3000, 3000, 128, 0), (2, 28, 4, 2500, 2500, 80, 700), (1, 7, 1, 1000, 5000, 128, 0),
            (1, 28, 4, 130, 130, 128, 0), (1, 14, 2, 4096, 4096, 64, 0)]
        for B, Hq, Hkv, Lq, Lk, D, pad in cases:
            q = torch.randn(B, Hq, Lq, D, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(B, Hkv, Lk, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            mask = None
            if pad:
                mask = torch.ones(B, Lk, dtype=torch.bool, device="cuda")
                mask[1, :pad] = False
            nq, nk = -(-Lq // 128), -(-Lk // 128)
            dense = levels[torch.randint(0, 5, (B, Hq, nq, nk), device="cuda")]
            dense[..., 0] = 1
            layout = LevelMap.from_dense(dense, block_q=128, block_k=128, q_len=Lq, k_len=Lk, causal=True,
                                         key_padding_mask=mask)
            want = psa_kernels.psa_attention(q, k, v, layout, causal=True, key_padding_mask=mask)
            got = psa_attention(q, k, v, layout, key_padding_mask=mask)
            torch.cuda.synchronize()
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            print(f"check B {B} heads {Hq}/{Hkv} Lq {Lq} Lk {Lk} D {D} pad {pad}: rel err vs Triton {err:.1e} "
                  f"nan {bool(got.isnan().any())} {'OK' if err < 1e-2 else 'MISMATCH'}", flush=True)
    for L in (int(x) for x in args.lengths.split(",")):
        q, k, v = video_like_qkv(L, 28, 4, 128, seed=0, device="cuda", dtype=torch.bfloat16)
        text = torch.zeros(1, L, dtype=torch.bool, device="cuda")
        text[:, L - 256:] = True
        sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        maps = {"all level 1": LevelMap.from_dense(torch.ones(1, 4, L // 128, L // 128, dtype=torch.int8,
                                                              device="cuda"), block_q=128, block_k=128, q_len=L,
                                                   k_len=L, causal=True)}
        for s in (0.65, 0.9):
            kw = load_preset("video_mme").at_sparsity(s, "quantile").mask_kwargs()
            maps[f"pyramid {s}"] = psa_kernels.build_level_map(q, k, causal=True, text_mask=text, compact=True, **kw)
        for name, layout in maps.items():
            want = psa_kernels.psa_attention(q, k, v, layout, causal=True)
            got = psa_attention(q, k, v, layout)
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            t_triton = bench(lambda layout=layout: psa_kernels.psa_attention(q, k, v, layout, causal=True))
            gluon = {f"{c}/{p} s{n}": bench(lambda layout=layout, c=c, p=p, n=n: psa_attention(
                q, k, v, layout, consumer_regs=c, producer_regs=p, nstage=n)) for c, p in splits for n in stages}
            times = ", ".join(f"Gluon {regs} {t:.3f} ({t / sdpa:.3f}x)" for regs, t in gluon.items())
            print(f"L {L} {name:12s}: SDPA {sdpa:.3f} ms, Triton {t_triton:.3f} ({t_triton / sdpa:.3f}x), {times}, "
                  f"rel err vs Triton {err:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
