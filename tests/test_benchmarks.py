"""The GPU benchmark script still runs end to end (tiny sizes; CPU: the PyTorch path, and
Triton's interpreter under ``-m slow``).

Timings here mean nothing; the test checks the script's plumbing and its outputs.
"""

import importlib
import json
import sys

import pytest
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _benchmark_module(name):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


@pytest.mark.usefixtures("kernels_path")
def test_attention_benchmark_smoke(tmp_path):
    bench = _benchmark_module("attention")
    bench.main(["--smoke", "--shapes", "vision-bidir", "--kinds", "video-like", "--presets", "fast",
                "--out", str(tmp_path)])
    report = json.loads((tmp_path / "attention.json").read_text())
    variants = report["rows"][0]["variants"]
    assert [v["name"] for v in variants] == ["fast"] + [f"sparsity {s}" for s in bench.FIXED_SPARSITIES]
    for v in variants:
        assert v["total_ms"] >= v["attend_ms"] > 0 and 0 <= v["sparsity"] < 1
        assert "mask_graph_ms" in v  # NaN off a GPU: nothing to replay
        assert "flex_error" not in v, v.get("flex_error")
        if v["sparsity"] > 0:  # skipping blocks changes the output, for PSA and for block-sparse alike
            assert v["rel_err"] > 0 and v["flex_rel_err"] > 0
    assert (tmp_path / "attention.png").stat().st_size > 10_000


def test_report_fixed_costs_table():
    """The fixed-cost table divides the mask's replayed GPU time by dense's replayed time and
    gives the host's addition as the call's time minus its replay's."""
    report = _benchmark_module("report")
    rows = [dict(kind="video-like", L=8192, dense_ms=0.80, dense_graph_ms=0.75, variants=[
        dict(name="sparsity 0.9", mask_graph_ms=0.15, call_ms=0.62, call_graph_ms=0.45),
        dict(name="old run", call_ms=0.5)])]  # a result file from before the column: left out
    lines = report.fixed_costs(dict(rows=rows), "video-like").splitlines()
    assert len(lines) == 3
    assert lines[2] == "| 8192 | sparsity 0.9 | 0.150 | 0.75 | 0.200 | 0.620 | 0.450 | +0.170 |"
    assert report.fixed_costs(dict(rows=rows), "random") == ""


def test_quantile_thresholds_hit_the_target_density():
    from psa_vlm.config import load_preset, quantile_thresholds

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import attention as bench
    finally:
        sys.path.pop(0)
    for s in (*bench.FIXED_SPARSITIES, 0.0, 0.3, 0.99):
        t = quantile_thresholds(s)
        assert list(t) == sorted(t) and 0 < t[0] and t[-1] <= 1
        fractions = [t[0], t[1] - t[0], t[2] - t[1], t[3] - t[2]]
        density = sum(f / p for f, p in zip(fractions, (1, 2, 4, 8)))
        assert abs(density - (1 - s)) < 1e-9
        config = load_preset("fast").at_sparsity(s)
        assert config.mode == "quantile" and config.thresholds == t and config.similarity is None
        assert not config.overrides and config.share_kv_group  # the preset's other settings stay
    for bad in (1.0, -0.1, "0.5", True):
        with pytest.raises(ValueError, match="sparsity"):
            quantile_thresholds(bad)
    with pytest.raises(ValueError, match="levels"):
        load_preset("block_sparse").at_sparsity(0.5)


def test_ncu_target_runs_its_three_kernels(capsys, monkeypatch):
    """The Nsight Compute target builds both maps and runs its rounds (on CPU: the same calls, on
    the PyTorch path; its kernels are the ones tests/test_kernels.py checks)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _benchmark_module("ncu_target").main(["--length", "384", "--sparsity", "0.65", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "L=384 sparsity" in out and "binary map of the same FLOPs" in out


def test_tune_importance_times_another_version_of_the_kernel_module():
    """``--baseline`` loads a copy of kernels/importance.py as a module of the package: its result
    on the same inputs is the current kernel's (the copy here is the current file)."""
    import torch

    import psa_kernels
    from psa_kernels.importance import antidiagonal_importance_triton
    from psa_kernels.utils import kernels_available

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not kernels_available(device):
        pytest.skip("no Triton kernels here")
    baseline = _benchmark_module("tune_importance").load_baseline(str(Path(psa_kernels.__file__).parent /
                                                                      "importance.py"))
    assert baseline is not antidiagonal_importance_triton
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    q = torch.randn(1, 2, 200, 16, generator=g).to(device)
    k = torch.randn(1, 1, 200, 16, generator=g).to(device)
    kw = dict(causal=True, block_q=64, block_k=32, stride=8)
    assert torch.equal(baseline(q, k, **kw), antidiagonal_importance_triton(q, k, **kw))


@pytest.mark.usefixtures("kernels_path")
def test_needle_key_blocks_maps_squares_to_the_blocks_of_their_tokens():
    """real_attention_error --needle-blocks: a square covers the merged tokens its pixels touch,
    counted in temporal-patch then row-major order among the visual tokens, wherever the text
    before them ends."""
    needle_key_blocks = _benchmark_module("real_attention_error").needle_key_blocks
    types = torch.zeros(1, 45, dtype=torch.long)
    types[0, 5:37] = 2  # 5 text tokens, 2 temporal patches of 4 x 4 merged tokens, text after
    inputs = {"mm_token_type_ids": types, "video_grid_thw": torch.tensor([[2, 8, 8]])}
    # 112-pixel frames: 28 pixels per merged token. Frame 2 is temporal patch 1.
    one = (2, 30, 60, 20)  # row 1, column 2 of patch 1: visual token 22, position 27, block 3 of 8 tokens
    four = (0, 20, 20, 20)  # rows 0-1, columns 0-1 of patch 0: visual tokens 0, 1, 4, 5: positions 5, 6, 9, 10
    assert needle_key_blocks([one], inputs, frame_side=112, block_k=8) == [3]
    assert needle_key_blocks([four], inputs, frame_side=112, block_k=8) == [0, 1]
    assert needle_key_blocks([one, four], inputs, frame_side=112, block_k=4) == [1, 2, 6]


@pytest.mark.usefixtures("kernels_path")
def test_exact_block_mass_is_each_last_row_softmax_summed_per_key_block():
    """real_attention_error's exact ranking: every row of the last query block spreads mass 1 over
    the keys it sees (a partial last block included), and each block's mass is its keys' share."""
    exact_block_mass = _benchmark_module("real_attention_error")._exact_block_mass
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, L, D, block = 2, 6, 2, 77, 16, 16
    q, k = torch.randn(B, Hq, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    mass = exact_block_mass(q, k, None, block=block)
    rows = L - (L - 1) // block * block  # 13 rows in the last block
    assert mass.shape == (B, Hq, 1, -(-L // block))
    assert torch.allclose(mass.sum(-1), torch.full((B, Hq, 1), float(rows)), atol=1e-4), f"seed {seed}"
    # Query head 4 reads kv head 1 (groups of 3); key block 0's mass is the last block's rows'
    # probabilities over its keys, summed.
    logits = q[1, 4, -rows:] @ k[1, 1].T / D**0.5
    pos = torch.arange(L)
    logits = logits.masked_fill(pos[None, :] > pos[-rows:][:, None], float("-inf"))
    want = logits.softmax(-1)[:, :block].sum()
    assert torch.allclose(mass[1, 4, 0, 0], want, atol=1e-5), f"seed {seed}"


# No kernels_path fixture: Gluon must be imported in the session's Triton mode (its standard
# library wraps Triton's, decorated at the session's start under TRITON_INTERPRET on a CPU).
def test_gluon_draft_second_phase_turns_block_log_sum_exps_into_the_reference_importance():
    """benchmarks/gluon_estimate.py (a draft whose Gluon kernel needs a GPU) finishes the estimate
    in PyTorch: this checks that second phase on a log-sum-exp strip computed here, so a mismatch
    on the GPU points at the kernel. Causal, Lq < Lk, a partial last query block."""
    from psa_kernels import reference
    from psa_kernels.reference import _strided_keys, _strided_queries

    importance_from_lse = _benchmark_module("gluon_estimate").importance_from_lse
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, Lq, Lk, D, S, block = 2, 4, 2, 150, 230, 16, 8, 32
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64)
    qs = _strided_queries(q, S)
    ks = _strided_keys(k, S).repeat_interleave(Hq // Hkv, dim=1)
    logits = torch.einsum("bhmd,bhnd->bhmn", qs, ks) * (D**-0.5 / S)
    rows, cols = torch.arange(qs.shape[2]), torch.arange(ks.shape[2])
    row_last = (Lk - Lq) + torch.clamp(rows * S + S - 1, max=Lq - 1)
    logits = logits.masked_fill(cols[None, :] * S > row_last[:, None], float("-inf"))
    per = block // S
    nk = -(-Lk // block)
    padded = torch.nn.functional.pad(logits, (0, nk * per - logits.shape[-1]), value=float("-inf"))
    lse = torch.logsumexp(padded.view(B, Hq, -1, nk, per), -1) / torch.log(torch.tensor(2.0, dtype=torch.float64))
    got = importance_from_lse(lse.reshape(B * Hq, -1, nk), B, Hq, Lq, stride=S, block_q=block)
    want = reference.antidiagonal_importance(q, k, causal=True, block_q=block, block_k=block, stride=S)
    assert got.shape == want.shape, f"seed {seed}"
    assert torch.allclose(got, want, atol=1e-9), f"seed {seed}: {(got - want).abs().max():.2e}"


def test_warp_specialised_gluon_variants_fit_an_sm_shared_memory():
    """benchmarks/gluon_estimate_ws.py (Gluon, GPU only) sizes its rings by hand: every variant's
    queries, key ring, reduction scratch and barriers must fit Hopper's 227 KB per block, or the
    launch fails on the GPU only."""
    ws = _benchmark_module("gluon_estimate_ws")
    limit = 227 * 1024
    queries = 2 * 8 * 64 * 128  # 128 strided rows x 8 chunks of 128 fp8 bytes
    reduction = 8 * 1024  # the second phase's cross-warp reduction
    for label, block_c, nstage, nstage_whole, *_ in ws.VARIANTS:
        barriers = 8 * (2 * max(nstage, nstage_whole) + 3)
        assert queries + nstage * block_c * 128 + barriers <= limit, label
        assert queries + nstage_whole * block_c * 128 + reduction + barriers <= limit, label
    for label, block_c, nstage in ws.COL_VARIANTS:
        assert queries + nstage * block_c * 128 + reduction + 8 * (2 * nstage + 3) <= limit, label
    for label, block_c, nstage in ws.QREG_VARIANTS:  # queries in registers: all key ring
        assert nstage * block_c * 128 + reduction + 8 * (2 * nstage + 2) <= limit, label


def test_gluon_attention_variants_fit_an_sm_shared_memory():
    """benchmarks/gluon_attention.py (Gluon, GPU only) sizes its K/V ring by hand: two 64-row query
    tiles and every stage's K and V tiles (bf16, head dim 128) plus the barriers must fit 227 KB."""
    attn = _benchmark_module("gluon_attention")
    for label, block_n, nstage, mode in attn.VARIANTS:
        queries = 2 * attn.ROWS * 128 * 2
        barriers = 8 * (3 * nstage + 3)
        assert queries + nstage * 2 * block_n * 128 * 2 + barriers <= 227 * 1024, label
        assert mode in (0, 1, 2), label


@pytest.mark.parametrize("name", ["tune_assign", "estimate_stride", "gluon_attention", "gluon_psa", "memory_call"])
def test_gpu_only_benchmarks_say_so_without_cuda(name, monkeypatch):
    """The assignment, stride and Gluon benchmarks time GPU kernels: without CUDA they stop with a
    one-line reason before any work, and their --help explains them."""
    module = _benchmark_module(name)
    with pytest.raises(SystemExit) as help_exit:
        module.main(["--help"])
    assert help_exit.value.code == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA"):
        module.main([])
