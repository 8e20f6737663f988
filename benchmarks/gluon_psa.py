"""The Hopper PSA kernel (:mod:`psa_kernels.attention_hopper`) beside the Triton kernel and SDPA:
a check against the Triton kernel on awkward shapes, then times on video-like inputs with every
pair at level 1 and with ``video_mme`` maps at sparsity 0.65 and 0.9, for each launch form asked
(ring stages, consumer/producer registers).

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

from psa_kernels.attention_hopper import psa_attention_hopper  # noqa: E402


def psa_attention(q, k, v, layout, *, causal=True, key_padding_mask=None, **launch):
    """The package's Hopper kernel with a :class:`LevelMap` planned for this call."""
    return psa_attention_hopper(q, k, v, layout, causal=causal, key_padding_mask=key_padding_mask, **launch)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="16384,32768,65536")
    parser.add_argument("--check", action="store_true", help="compare with the Triton kernel on awkward cases first")
    parser.add_argument("--offline", action="store_true", help="compile for sm_90 without a GPU")
    parser.add_argument("--regs", default="232/40,240/24",
                        help="consumer/producer register splits to time (offline: 128 and 56 bytes of spills)")
    parser.add_argument("--stages", default="2", help="ring stages to time (3 fills 224 KB of shared memory)")
    parser.add_argument("--lead", default="1", help="whole level-1 stages in their own loop (1) or not (0); "
                        "comma-separated to time both")
    args = parser.parse_args(argv)
    try:
        splits = [tuple(int(x) for x in split.split("/")) for split in args.regs.split(",")]
        stages = [int(x) for x in args.stages.split(",")]
        leads = [int(x) for x in args.lead.split(",")]
    except ValueError:
        splits, stages, leads = [], [], []  # (not a number somewhere)
    if not splits or any(len(split) != 2 for split in splits) or not set(leads) <= {0, 1}:
        parser.error(f"--regs takes CONSUMER/PRODUCER pairs (240/24,232/40), --stages integers (2,3), --lead 0 "
                     f"and/or 1; got --regs {args.regs!r} --stages {args.stages!r} --lead {args.lead!r}")
    leads = [bool(x) for x in leads]
    from psa_kernels import LevelMap

    if args.offline:
        from benchmarks.offline_compile import compile_and_report

        q = torch.randn(1, 28, 4096, 128, dtype=torch.bfloat16)
        k, v = (torch.randn(1, 4, 4096, 128, dtype=torch.bfloat16) for _ in range(2))
        dense = torch.randint(0, 4, (1, 28, 32, 32), dtype=torch.int8)
        layout = LevelMap.from_dense(torch.tensor([0, 1, 2, 4, 8], dtype=torch.int8)[dense.long()], block_q=128,
                                     block_k=128, q_len=4096, k_len=4096, causal=True)
        for label, mask, nstage, lead in [(f"causal {n} stages lead {int(ld)}", None, n, ld) for n in stages
                                          for ld in leads] + [
                ("causal padded", torch.ones(1, 4096, dtype=torch.bool), stages[0], leads[0])]:
            compile_and_report(label, lambda mask=mask, nstage=nstage, lead=lead: psa_attention(
                q, k, v, layout, key_padding_mask=mask, nstage=nstage, lead_loop=lead), Path("/tmp/gluon_psa"),
                keep=lambda name: name == "_psa_kernel")
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("gluon_psa.py runs Gluon kernels for Hopper: run it on a machine with CUDA "
                         "(or compile them with --offline)")
    import torch.nn.functional as F
    from triton.testing import do_bench

    import psa_kernels
    from psa_kernels.attention import psa_attention_triton
    from psa_vlm.compare import video_like_qkv
    from psa_vlm.config import load_preset

    def bench(f):
        return do_bench(f, warmup=10, rep=50, return_mode="median")

    if args.check:
        levels = torch.tensor([0, 1, 2, 4, 8], dtype=torch.int8, device="cuda")
        bf16, fp16 = torch.bfloat16, torch.float16
        cases = [  # (B, Hq, Hkv, Lq, Lk, D, pad of the second sample, token-major [B, L, H, D] memory, dtype)
            (1, 28, 4, 3000, 3000, 128, 0, False, bf16), (2, 28, 4, 2500, 2500, 80, 700, False, bf16),
            (1, 7, 1, 1000, 5000, 128, 0, False, bf16), (1, 28, 4, 130, 130, 128, 0, False, bf16),
            (1, 14, 2, 4096, 4096, 64, 0, False, bf16), (2, 28, 4, 2000, 2000, 128, 500, True, bf16),
            (1, 14, 2, 1000, 3000, 128, 0, True, bf16), (2, 28, 4, 2000, 2000, 128, 500, False, fp16)]
        for B, Hq, Hkv, Lq, Lk, D, pad, tm, dtype in cases:
            def make(H, L):
                if tm:
                    return torch.randn(B, L, H, D, device="cuda", dtype=dtype).transpose(1, 2)
                return torch.randn(B, H, L, D, device="cuda", dtype=dtype)
            q = make(Hq, Lq)
            k, v = make(Hkv, Lk), make(Hkv, Lk)
            mask = None
            if pad:
                mask = torch.ones(B, Lk, dtype=torch.bool, device="cuda")
                mask[1, :pad] = False
            nq, nk = -(-Lq // 128), -(-Lk // 128)
            dense = levels[torch.randint(0, 5, (B, Hq, nq, nk), device="cuda")]
            dense[..., 0] = 1
            layout = LevelMap.from_dense(dense, block_q=128, block_k=128, q_len=Lq, k_len=Lk, causal=True,
                                         key_padding_mask=mask)
            want = psa_attention_triton(q, k, v, layout, causal=True, key_padding_mask=mask)
            got = psa_attention(q, k, v, layout, key_padding_mask=mask)
            # A second launch (the compiled launcher, not Triton's path), through the op where it
            # picks this kernel (bf16)
            again = (psa_kernels.psa_attention if dtype == bf16 else psa_attention)(
                q, k, v, layout, causal=True, key_padding_mask=mask)
            torch.cuda.synchronize()
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            same = torch.equal(got, again)
            print(f"check B {B} heads {Hq}/{Hkv} Lq {Lq} Lk {Lk} D {D} pad {pad} token-major {tm} {dtype}: "
                  f"rel err vs Triton {err:.1e} "
                  f"nan {bool(got.isnan().any())} op/second launch bit-equal {same} "
                  f"{'OK' if err < 1e-2 and same else 'MISMATCH'}", flush=True)
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
            want = psa_attention_triton(q, k, v, layout, causal=True)
            got = psa_attention(q, k, v, layout)
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            t_triton = bench(lambda layout=layout: psa_attention_triton(q, k, v, layout, causal=True))
            gluon = {f"{c}/{p} s{n}{' lead' if lead else ''}": bench(
                lambda layout=layout, c=c, p=p, n=n, lead=lead: psa_attention(
                    q, k, v, layout, consumer_regs=c, producer_regs=p, nstage=n, lead_loop=lead))
                for c, p in splits for n in stages for lead in leads}
            times = ", ".join(f"Gluon {regs} {t:.3f} ({t / sdpa:.3f}x)" for regs, t in gluon.items())
            print(f"L {L} {name:12s}: SDPA {sdpa:.3f} ms, Triton {t_triton:.3f} ({t_triton / sdpa:.3f}x), {times}, "
                  f"rel err vs Triton {err:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
