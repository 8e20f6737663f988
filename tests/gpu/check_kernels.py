"""GPU check of the Triton PSA kernels at real sizes (run on a CUDA machine, not collected by pytest).

    python tests/gpu/check_kernels.py [--out DIR] [--quick]

1. Kernels vs the fp32 reference (``psa_kernels.reference``) on fresh random inputs, each case
   through the kernel the op picks and, where that is the Hopper kernel, the Triton kernel too: causal
   prefill with the Qwen2.5-VL-7B text shape (28/4 heads, D=128, bf16) up to 32k tokens, with
   level maps from the mask generator on video-like inputs and random ones; chunked prefill
   (Lq < Lk); a left-padded batch; the vision-tower shape (16/16 heads, D=80, bidirectional);
   other head dims. Pass: relative error < 1e-2, no NaN/Inf.
2. The streamed antidiagonal importance kernel vs the reference (and its time vs dense SDPA).
   Memory: peak GPU memory above the inputs of one whole PSA call (mask generation + attention)
   at 64k tokens vs the dense SDPA call's (<= 1.3x).
3. Mask generation + attention captured in a CUDA graph and replayed (same output as eager).
   Kernel times vs dense SDPA (informative; benchmarks/ holds the real benchmark).
4. fp32 on the GPU: a whole 16k causal PSA call (3xTF32 dots) against bf16, fp32 SDPA and fp64.
5. The tiny Qwen2.5-VL end to end on the GPU: "psa" with the dense preset vs "sdpa".

Prints a table and writes ``check_kernels.json`` to ``--out`` (default: $OUT or the cwd).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import psa_kernels
from psa_kernels import reference

LEVELS = torch.tensor([0, 1, 2, 4, 8], dtype=torch.int8)


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()


def video_like(B, H, L, D, seed, device):
    """Smooth spatio-temporal token field + noise (what makes pooling and sparsity realistic)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = torch.arange(L, dtype=torch.float32)
    freqs = torch.rand(8, generator=g) * 0.02 + 0.001
    phases = torch.rand(8, generator=g) * 6.28
    field = torch.sin(t[:, None] * freqs[None, :] + phases[None, :])  # [L, 8]
    basis = torch.randn(H, 8, D, generator=g)
    x = torch.einsum("lf,hfd->hld", field, basis)[None].expand(B, H, L, D).clone()
    x += 0.3 * torch.randn(B, H, L, D, generator=g)
    return x.to(device)


def random_map(B, H, nq, nk, seed, device):
    g = torch.Generator().manual_seed(seed)
    lm = LEVELS[torch.randint(0, 5, (B, H, nq, nk), generator=g)]
    lm[..., 0] = 1
    return lm.to(device)


def accuracy_case(name, *, B, Hq, Hkv, Lq, Lk, D, causal, block_q=128, block_k=128, padded=False,
                  mask="generated", seed=0, dtype=torch.bfloat16, device="cuda"):
    torch.manual_seed(seed)
    if mask == "generated":
        q = video_like(B, Hq, Lq, D, seed, device)
        k = video_like(B, Hkv, Lk, D, seed + 1, device)
        v = torch.randn(B, Hkv, Lk, D, device=device)
    else:
        q, k, v = (torch.randn(B, h, L, D, device=device) for h, L in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk)))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    pad = None
    if padded:
        pad = torch.ones(B, Lk, dtype=torch.bool, device=device)
        pad[0, : Lk // 3] = False
    nq, nk = math.ceil(Lq / block_q), math.ceil(Lk / block_k)
    if mask == "generated":
        lm = reference.build_level_map(q, k, causal=causal, block_q=block_q, block_k=block_k, key_padding_mask=pad,
                                       thresholds=(0.5, 0.7, 0.85, 0.95), similarity=(0.6, 0.5, 0.5))
    else:
        lm = random_map(B, Hq, nq, nk, seed, device)
    kw = dict(causal=causal, block_q=block_q, block_k=block_k, key_padding_mask=pad)
    out = psa_kernels.psa_attention(q, k, v, lm, **kw)
    torch.cuda.synchronize()
    ref = reference.psa_attention(q.float(), k.float(), v.float(), lm, **kw)
    finite = bool(torch.isfinite(out).all())
    err = rel_err(out, ref)
    sp = psa_kernels.sparsity(lm, q_len=Lq, k_len=Lk, **{k_: kw[k_] for k_ in ("causal", "block_q", "block_k",
                                                                               "key_padding_mask")}).mean().item()
    levels = {int(p): round((lm == p).float().mean().item(), 3) for p in (0, 1, 2, 4, 8)}
    ok = finite and err < 1e-2
    return dict(case=name, B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, causal=causal, block_q=block_q, block_k=block_k,
                padded=padded, mask=mask, dtype=str(dtype), rel_err=err, finite=finite, sparsity=sp,
                level_shares=levels, ok=ok)


def dense_map_vs_sdpa(L=8192, device="cuda"):
    """All pairs at level 1 must be dense attention: compare with torch SDPA directly."""
    q = torch.randn(1, 28, L, 128, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, 4, L, 128, device=device, dtype=torch.bfloat16)
    v = torch.randn(1, 4, L, 128, device=device, dtype=torch.bfloat16)
    lm = torch.ones(1, 4, L // 128, L // 128, dtype=torch.int8, device=device)
    out = psa_kernels.psa_attention(q, k, v, lm, causal=True)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
    err = rel_err(out, ref)
    return dict(case="all level 1 vs SDPA (fp32)", L=L, rel_err=err, ok=err < 1e-2 and bool(torch.isfinite(out).all()))


def importance_check(L, device="cuda"):
    """The streamed antidiagonal kernel vs the reference at both precisions, and its time vs
    dense SDPA; the fused assignment against the reference's tensor ops on the same scores."""
    from triton.testing import do_bench

    from psa_kernels.importance import antidiagonal_importance_triton

    q = video_like(1, 28, L, 128, 7, device).to(torch.bfloat16)
    k = video_like(1, 4, L, 128, 8, device).to(torch.bfloat16)
    v = torch.randn_like(k)
    dense_ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                        warmup=25, rep=100, return_mode="median")
    rows = []
    for stride, precision in ((8, "full"), (8, "fp8"), (16, "fp8")):
        got = antidiagonal_importance_triton(q, k, causal=True, stride=stride, precision=precision)
        want = reference.antidiagonal_importance(q.float(), k.float(), causal=True, stride=stride,
                                                 precision=precision) if L <= 16384 else None
        err = rel_err(got, want) if want is not None else float("nan")
        ms = do_bench(lambda: antidiagonal_importance_triton(q, k, causal=True, stride=stride, precision=precision),
                      warmup=10, rep=50, return_mode="median")
        # The fused assignment kernel vs the reference's tensor ops on the same scores (the paper's
        # preset; the only differences can come from summing a GQA group in another order).
        kw = dict(causal=True, scores=got, mode="energy", thresholds=(0.7, 0.8, 0.9, 0.9),
                  similarity=(0.75, 0.70, 0.70), share_kv_group=stride == 16)
        fused = psa_kernels.build_level_map(q, k, compact=True, **kw)
        agree = (fused.to_dense() == reference.build_level_map(q, k, **kw)).float().mean().item()
        assign_ms = do_bench(lambda: psa_kernels.build_level_map(q, k, compact=True, **kw), warmup=10, rep=50,
                             return_mode="median")
        # fp8 products on the tensor cores accumulate in reduced precision: a looser bound there.
        tol = 1e-2 if precision == "full" else 3e-2
        rows.append(dict(L=L, stride=stride, precision=precision, rel_err=err, ms=ms, dense_ms=dense_ms,
                         ratio=ms / dense_ms, assign_agreement=agree, assign_ms=assign_ms,
                         ok=(want is None or err < tol) and bool(torch.isfinite(got).all()) and agree > 0.999))
    return rows


def graph_check(L=8192, device="cuda"):
    """Mask generation + attention captured in one CUDA graph (fixed shape) and replayed: the
    same output as eager execution (no host synchronisation inside, or capture fails)."""
    q = video_like(1, 28, L, 128, 11, device).to(torch.bfloat16)
    k = video_like(1, 4, L, 128, 12, device).to(torch.bfloat16)
    v = torch.randn_like(k)
    kw = dict(causal=True, mode="energy", thresholds=(0.7, 0.8, 0.9, 0.9), similarity=(0.75, 0.70, 0.70),
              estimate_precision="fp8")

    def step():
        layout = psa_kernels.build_level_map(q, k, compact=True, **kw)
        return psa_kernels.psa_attention(q, k, v, layout, causal=True)

    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: compilation, allocator pools
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = step()
        graph.replay()
        torch.cuda.synchronize()
    except Exception as err:  # noqa: BLE001 - report why capture failed
        return dict(case="CUDA graph (mask generation + attention)", L=L, rel_err=float("nan"), ok=False,
                    error=f"{type(err).__name__}: {err}"[:300])
    err = rel_err(out, eager)
    return dict(case="CUDA graph (mask generation + attention)", L=L, rel_err=err, ok=err < 1e-4)


def peak_memory(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(), base


def memory_check(L=32768, device="cuda"):
    """Peak memory above the inputs of one whole PSA call as the "psa" hook makes it (mask
    generation with the video_mme preset, then the attention) against the dense SDPA call's."""
    from psa_vlm.config import load_preset

    Hq, Hkv, D = 28, 4, 128
    q = video_like(1, Hq, L, D, 21, device).to(torch.bfloat16)
    k = video_like(1, Hkv, L, D, 22, device).to(torch.bfloat16)
    v = torch.randn_like(k)
    kw = load_preset("video_mme").mask_kwargs()

    def psa_call():
        layout = psa_kernels.build_level_map(q, k, causal=True, compact=True, **kw)
        return psa_kernels.psa_attention(q, k, v, layout, causal=True)

    psa_call()  # compile outside the measurement
    dense_peak, base = peak_memory(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    psa_peak, _ = peak_memory(psa_call)
    ratio = (psa_peak - base) / (dense_peak - base)
    return dict(L=L, inputs_mb=base / 2**20, dense_increment_mb=(dense_peak - base) / 2**20,
                psa_increment_mb=(psa_peak - base) / 2**20, ratio=ratio, ok=ratio <= 1.3)


def timing(L, density_levels, device="cuda"):
    from triton.testing import do_bench

    Hq, Hkv, D, bq, bk = 28, 4, 128, 128, 128
    q = torch.randn(1, Hq, L, D, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, Hkv, L, D, device=device, dtype=torch.bfloat16)
    v = torch.randn(1, Hkv, L, D, device=device, dtype=torch.bfloat16)
    dense_ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                        warmup=25, rep=100, return_mode="median")
    nq = nk = L // bq
    rows = []
    for name, lm in density_levels(nq, nk):
        lm = lm.to(device)
        ms = do_bench(lambda: psa_kernels.psa_attention(q, k, v, lm, causal=True, block_q=bq, block_k=bk),
                      warmup=25, rep=100, return_mode="median")
        sp = psa_kernels.sparsity(lm, causal=True, q_len=L, k_len=L, block_q=bq, block_k=bk).mean().item()
        rows.append(dict(L=L, map=name, sparsity=sp, psa_ms=ms, dense_ms=dense_ms, ratio=ms / dense_ms))
    return rows


def maps_for_timing(nq, nk):
    full = torch.ones(1, 28, nq, nk, dtype=torch.int8)
    yield "all level 1", full
    g = torch.Generator().manual_seed(0)
    # Paper-like mix: ~10% level 1, 10% level 2, 10% level 4, 20% level 8, rest skipped (+ sink/diagonal).
    u = torch.rand(1, 28, nq, nk, generator=g)
    mix = torch.where(u < 0.1, 1, torch.where(u < 0.2, 2, torch.where(u < 0.3, 4, torch.where(u < 0.5, 8, 0))))
    mix = mix.to(torch.int8)
    mix[..., 0] = 1
    idx = torch.arange(nq)
    mix[..., idx, idx] = 1
    yield "mixed pyramid", mix
    binary = (u < 0.2).to(torch.int8)
    binary[..., 0] = 1
    binary[..., idx, idx] = 1
    yield "binary 20%", binary


def fp32_check(L=16384, device="cuda"):
    """A whole fp32 PSA call on the GPU (3xTF32 dots) against the same call in bf16, dense fp32 SDPA,
    and the fp64-accurate reference's output on the same level map."""
    from triton.testing import do_bench

    from psa_vlm.config import load_preset

    q = video_like(1, 28, L, 128, 31, device)
    k = video_like(1, 4, L, 128, 32, device)
    v = torch.randn_like(k)
    kw = load_preset("video_mme").mask_kwargs()
    rows = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        qq, kk, vv = q.to(dtype), k.to(dtype), v.to(dtype)

        def call():
            layout = psa_kernels.build_level_map(qq, kk, causal=True, compact=True, **kw)
            return psa_kernels.psa_attention(qq, kk, vv, layout, causal=True), layout

        out, layout = call()
        ms = do_bench(lambda: call(), warmup=5, rep=50, return_mode="median")
        rows[name] = dict(ms=ms, out=out, layout=layout)
    layout = rows["fp32"]["layout"]
    ref = psa_kernels.psa_attention(q[:, :, -2048:].double(), k.double(), v.double(), layout.to_dense()[:, :, -16:],
                                    causal=True)  # the last 2,048 queries, in fp64
    err = rel_err(rows["fp32"]["out"][:, :, -2048:], ref)
    dense_ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), warmup=5,
                        rep=50, return_mode="median")
    return dict(L=L, fp32_call_ms=rows["fp32"]["ms"], bf16_call_ms=rows["bf16"]["ms"], dense_fp32_ms=dense_ms,
                fp32_rel_err_vs_fp64=err, ok=err < 1e-4 and rows["fp32"]["ms"] < 10 * rows["bf16"]["ms"])


def tiny_model_check(device="cuda"):
    import psa_vlm
    from psa_vlm import testing
    from psa_vlm.video import video_inputs

    processor = testing.build_tiny_processor()
    frames = testing.make_video_frames(16, 224, 224, seed=0)
    inputs = video_inputs(processor, [frames, frames], ["What colour is the square?", "Where does the disc go at the end?"],
                          **testing.TINY_VIDEO).to(device)
    results = {}
    for attn in ("sdpa", "psa"):
        model = testing.build_tiny_model(seed=0, attn_implementation=attn).to(device)
        if attn == "psa":
            psa_vlm.configure(model, "dense", block_q=64, block_k=32, min_seq_len=0)
        with torch.no_grad():
            logits = model(**inputs).logits
            tokens = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        results[attn] = (logits, tokens, model)
    mask = inputs["attention_mask"].bool()
    diff = (results["psa"][0][mask] - results["sdpa"][0][mask]).abs().max().item()
    same = bool(torch.equal(results["psa"][1], results["sdpa"][1]))
    psa_calls = sum(s.psa_calls for s in psa_vlm.stats(results["psa"][2]))
    return dict(max_logit_diff=diff, tokens_identical=same, psa_calls=psa_calls, ok=diff < 1e-3 and same
                and psa_calls > 0)


def batch_invariance_check(device="cuda"):
    """A left-padded sample through the attention hook equals the sample alone (fp32 and bf16),
    for the shipped presets and PSA at sparsity 0.8 with each policy, on the GPU kernels."""
    from psa_vlm import attention, runtime
    from psa_vlm.config import load_preset

    class Layer(torch.nn.Module):
        is_causal = True

    def hook(config, q, k, v, mask):
        module = Layer()
        setattr(module, runtime._STATE_ATTR, runtime.LayerState(config, "text", 0))
        return attention.psa_attention_forward(module, q, k, v, mask, is_causal=True)[0]

    base = load_preset("video_mme").replace(min_seq_len=0)
    configs = {name: load_preset(name).replace(min_seq_len=0) for name in ("video_mme", "fast", "block_sparse")}
    configs.update({"quantile@0.8": base.at_sparsity(0.8), "budget@0.8": base.at_sparsity(0.8, "budget")})
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        L, pad = 6000, 1337  # not block multiples; GQA 28/4
        q = video_like(2, 28, L, 128, 11, device).to(dtype)
        k = video_like(2, 4, L, 128, 12, device).to(dtype)
        v = torch.randn(2, 4, L, 128, device=device, dtype=dtype)
        mask = torch.ones(2, L, dtype=torch.bool, device=device)
        mask[0, :pad] = False
        for name, config in configs.items():
            batched = hook(config, q, k, v, mask)
            alone = hook(config, q[:1, :, pad:], k[:1, :, pad:], v[:1, :, pad:], None)
            diff = (batched[0, pad:].float() - alone[0].float()).abs().max().item()
            rows.append(dict(preset=name, dtype=str(dtype), max_abs_diff=diff, ok=diff <= (1e-5 if dtype == torch.float32
                                                                                            else 1e-2)))
    return dict(rows=rows, ok=all(r["ok"] for r in rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for check_kernels.json")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke test)")
    parser.add_argument("--memory-length", type=int, default=0, help="tokens of the memory check (default 64k; "
                        "16k with --quick)")
    parser.add_argument("--sections", default="accuracy,importance,graph,memory,timing,fp32,tiny,batch",
                        help="comma-separated subset of: accuracy,importance,graph,memory,timing,fp32,tiny,batch")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("check_kernels.py needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    t0 = time.time()
    big = 8192 if args.quick else 32768
    cases = [
        ("causal 28/4 D128 generated", dict(B=1, Hq=28, Hkv=4, Lq=8192, Lk=8192, D=128, causal=True)),
        ("causal 28/4 D128 random 16k", dict(B=1, Hq=28, Hkv=4, Lq=16384, Lk=16384, D=128, causal=True,
                                             mask="random")),
        ("causal 28/4 D128 generated 32k", dict(B=1, Hq=28, Hkv=4, Lq=big, Lk=big, D=128, causal=True)),
        ("chunked prefill Lq<Lk", dict(B=1, Hq=28, Hkv=4, Lq=4000, Lk=big - 77, D=128, causal=True)),
        ("left-padded batch 2", dict(B=2, Hq=28, Hkv=4, Lq=8000, Lk=8000, D=128, causal=True, padded=True)),
        ("vision 16/16 D80 bidir", dict(B=1, Hq=16, Hkv=16, Lq=16384, Lk=16384, D=80, causal=False)),
        ("vision D80 block_k 32", dict(B=1, Hq=16, Hkv=16, Lq=4100, Lk=4100, D=80, causal=False, block_k=32,
                                       block_q=64, mask="random")),
        ("D64 block_k 64 fp16", dict(B=1, Hq=14, Hkv=2, Lq=5000, Lk=5000, D=64, causal=True, block_k=64,
                                     dtype=torch.float16, mask="random")),
        ("D256 GQA 7", dict(B=1, Hq=14, Hkv=2, Lq=3000, Lk=3000, D=256, causal=True, mask="random")),
        ("fp32 causal D128 16-multiple", dict(B=1, Hq=8, Hkv=2, Lq=4096, Lk=4096, D=128, causal=True,
                                              dtype=torch.float32, mask="random")),
    ]
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "accuracy": [], "memory": None,
              "timing": [], "tiny_model": None}
    print(f"\n{'case [kernel]':34s} {'Lq':>6s} {'Lk':>6s} {'sparsity':>8s} {'rel_err':>9s}  ok")
    sections = set(args.sections.split(","))
    for i, (name, kw) in enumerate(cases if "accuracy" in sections else []):
        # Each case through the kernel the op picks (the Hopper kernel where it serves) and, where
        # that is another, through the Triton kernel too.
        probe = torch.empty(1, 1, 1, kw["D"], dtype=kw.get("dtype", torch.bfloat16), device="cuda")
        picked = psa_kernels.attention_kernel(probe, kw.get("block_q", 128), kw.get("block_k", 128))
        for kernel in dict.fromkeys((picked, "triton")):
            os.environ[psa_kernels.ops.KERNEL_ENV] = "auto" if kernel == picked else "triton"
            r = accuracy_case(name, seed=i, **kw)
            r["kernel"] = kernel
            report["accuracy"].append(r)
            print(f"{name + ' [' + kernel + ']':34s} {r['Lq']:6d} {r['Lk']:6d} {r['sparsity']:8.3f} "
                  f"{r['rel_err']:9.2e}  {r['ok']}", flush=True)
            torch.cuda.empty_cache()
        os.environ.pop(psa_kernels.ops.KERNEL_ENV)
    dense = dense_map_vs_sdpa() if "accuracy" in sections else {"case": "skipped", "L": 0, "rel_err": 0.0, "ok": True}
    report["dense_vs_sdpa"] = dense
    print(f"{dense['case']:34s} {dense['L']:6d} {dense['L']:6d} {0.0:8.3f} {dense['rel_err']:9.2e}  {dense['ok']}")
    report["importance"] = []
    print(f"\n{'antidiagonal importance':24s} {'L':>6s} {'stride':>6s} {'prec':>5s} {'rel_err':>9s} {'ms':>7s} "
          f"{'x sdpa':>7s}")
    for L in ([8192] if args.quick else [16384, 32768]) if "importance" in sections else []:
        for r in importance_check(L):
            report["importance"].append(r)
            print(f"{'':24s} {r['L']:6d} {r['stride']:6d} {r['precision']:>5s} {r['rel_err']:9.2e} {r['ms']:7.2f} "
                  f"{r['ratio']:7.2f}"
                  f"  assign {r['assign_ms']:.2f} ms, agreement {r['assign_agreement']:.5f}  {r['ok']}", flush=True)
    report["graph"] = graph_check() if "graph" in sections else {"ok": True, "skipped": True}
    print(f"\nCUDA graph capture: {report['graph']}", flush=True)
    mem = memory_check(args.memory_length or 2 * big) if "memory" in sections else dict(
        L=0, inputs_mb=0, dense_increment_mb=0, psa_increment_mb=0, ratio=0, ok=True)
    report["memory"] = mem
    print(f"\nmemory at {mem['L']} tokens: inputs {mem['inputs_mb']:.0f} MB, dense SDPA call +{mem['dense_increment_mb']:.0f} "
          f"MB, whole PSA call +{mem['psa_increment_mb']:.0f} MB, ratio {mem['ratio']:.3f} (<= 1.3: {mem['ok']})",
          flush=True)
    if not mem["ok"]:
        print(f"  what is alive at the peak, with the line that made it: python benchmarks/memory_call.py "
              f"--length {mem['L']} --video-like --trace", flush=True)
    print(f"\n{'L':>6s} {'map':16s} {'sparsity':>8s} {'psa ms':>8s} {'sdpa ms':>8s} {'ratio':>6s}")
    for L in ([8192] if args.quick else [16384, 32768]) if "timing" in sections else []:
        for r in timing(L, maps_for_timing):
            report["timing"].append(r)
            print(f"{r['L']:6d} {r['map']:16s} {r['sparsity']:8.3f} {r['psa_ms']:8.2f} {r['dense_ms']:8.2f} "
                  f"{r['ratio']:6.2f}", flush=True)
        torch.cuda.empty_cache()
    report["fp32"] = fp32_check() if "fp32" in sections else {"ok": True, "skipped": True}
    print(f"\nfp32 on the GPU: {report['fp32']}", flush=True)
    try:
        report["tiny_model"] = tiny_model_check() if "tiny" in sections else {"ok": True, "skipped": True}
    except ImportError as err:  # qwen-vl-utils missing on the machine
        report["tiny_model"] = {"ok": False, "error": str(err)}
    print(f"\ntiny model on GPU, dense preset vs sdpa: {report['tiny_model']}")
    report["batch_invariance"] = batch_invariance_check() if "batch" in sections else {"ok": True, "skipped": True}
    print(f"\nbatch invariance (padded sample vs alone, via the hook): {report['batch_invariance']}", flush=True)
    ok = (all(r["ok"] for r in report["accuracy"] + report["importance"]) and dense["ok"] and mem["ok"]
          and report["graph"]["ok"] and report["fp32"]["ok"]
          and report["tiny_model"]["ok"] and report["batch_invariance"]["ok"])
    report["all_ok"] = ok
    report["seconds"] = time.time() - t0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "check_kernels.json").write_text(json.dumps(report, indent=1))
    print(f"\nALL OK: {ok}  ({report['seconds']:.0f} s)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
