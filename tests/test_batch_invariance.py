"""A sample's PSA output does not depend on the padding around it.

The attention hook runs a causal left-padded batch sample by sample on its real tokens, so the
block grid, the pyramid's pooling groups and the estimate's sampling start at each sample's first
real token, as they do when the sample runs alone. Checked on every path the op dispatches to:
the fp64 reference, the blockwise CPU path and the Triton kernels (the interpreter in CI).
"""

from __future__ import annotations

import pytest
import torch

import psa_kernels
from psa_kernels import ops
from psa_vlm import attention, runtime
from psa_vlm.config import load_preset

# The shipped presets, and PSA at a fixed sparsity with each assignment policy (these skip and
# pool blocks even at the short lengths an interpreter affords, so the check is not vacuous).
PRESETS = ["video_mme", "fast", "block_sparse", "dense"]
AT_SPARSITY = {"quantile@0.6": ("video_mme", "quantile"), "budget@0.6": ("video_mme", "budget")}
SMALL = dict(block_q=64, block_k=32, min_seq_len=0, dense_tail_tokens=8)


class _Layer(torch.nn.Module):
    is_causal = True


def layer(preset: str, **overrides) -> torch.nn.Module:
    module = _Layer()
    if preset in AT_SPARSITY:
        base, policy = AT_SPARSITY[preset]
        config = load_preset(base).replace(**SMALL).at_sparsity(0.6, policy).replace(**overrides)
    else:
        config = load_preset(preset).replace(**{**SMALL, **overrides})
    setattr(module, runtime._STATE_ATTR, runtime.LayerState(config, "text", 0))
    return module


def qkv(B, Hq, Hkv, L, D, dtype, generator):
    # Queries 3x keys' scale: peaked enough for the presets to skip and pool blocks at these lengths.
    q = 3 * torch.randn(B, Hq, L, D, generator=generator, dtype=dtype)
    k = torch.randn(B, Hkv, L, D, generator=generator, dtype=dtype)
    v = torch.randn(B, Hkv, L, D, generator=generator, dtype=dtype)
    return q, k, v


def hook(module, q, k, v, mask):
    out, _ = attention.psa_attention_forward(module, q, k, v, mask, scaling=q.shape[-1] ** -0.5, is_causal=True)
    return out  # [B, Lq, Hq, D]


PATHS = {
    "reference": dict(dtype=torch.float64, triton=False),
    "blockwise": dict(dtype=torch.float32, triton=False),
    "triton": dict(dtype=torch.float32, triton=True),
}


def _cases():
    # The Triton interpreter takes 20-60 s a case: the default preset runs in every suite run,
    # the other presets' kernel runs under the slow marker (which .ci/run also runs).
    for preset in PRESETS + list(AT_SPARSITY):
        for path in PATHS:
            slow = path == "triton" and preset != "video_mme"
            yield pytest.param(preset, path, marks=[pytest.mark.slow] if slow else [], id=f"{preset}-{path}")


@pytest.mark.parametrize("preset, path", list(_cases()))
def test_padded_sample_equals_the_sample_alone(preset, path, monkeypatch):
    setting = PATHS[path]
    if setting["triton"] and not psa_kernels.kernels_available("cpu"):
        pytest.skip("the Triton path needs TRITON_INTERPRET=1 on a CPU")
    if not setting["triton"]:
        monkeypatch.setattr(ops, "kernels_available", lambda device: False)
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    # GQA ratio 7, head dim 80, lengths that are not block multiples; sample 0 is 97 tokens shorter.
    Hq, Hkv, D = 7, 1, 80
    L, pad = (237, 75) if preset in AT_SPARSITY else (170, 57)
    q, k, v = qkv(2, Hq, Hkv, L, D, setting["dtype"], g)
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[0, :pad] = False
    module = layer(preset)
    batched = hook(module, q, k, v, mask)
    alone = hook(layer(preset), q[:1, :, pad:], k[:1, :, pad:], v[:1, :, pad:], None)
    longer = hook(layer(preset), q[1:], k[1:], v[1:], None)
    assert (batched[0, pad:] - alone[0]).abs().max().item() <= 1e-5
    assert (batched[1] - longer[0]).abs().max().item() <= 1e-5
    assert batched[0, :pad].abs().max().item() == 0  # padding queries see no real key
    assert torch.isfinite(batched).all()
    state = getattr(module, runtime._STATE_ATTR)
    if preset != "dense":
        assert state.psa_calls == 2  # one PSA call per sample, counted as such
    if preset in AT_SPARSITY:  # blocks were pooled or skipped (forced blocks dominate at these lengths)
        assert float(state.sparsity_sum.mean()) / state.psa_calls > 0.02


def test_queries_shorter_than_keys_keep_their_positions():
    # A prefill chunk after a cached prefix: queries are the last Lq positions of the keys.
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    Lk, Lq, pad = 300, 200, 130  # sample 0's padding reaches into the query rows
    q, _, _ = qkv(2, 4, 2, Lq, 64, torch.float64, g)
    _, k, v = qkv(2, 4, 2, Lk, 64, torch.float64, g)
    mask = torch.ones(2, Lk, dtype=torch.bool)
    mask[0, :pad] = False
    batched = hook(layer("video_mme"), q, k, v, mask)
    first = pad - (Lk - Lq)
    alone = hook(layer("video_mme"), q[:1, :, first:], k[:1, :, pad:], v[:1, :, pad:], None)
    assert (batched[0, first:] - alone[0]).abs().max().item() <= 1e-10
    assert batched[0, :first].abs().max().item() == 0


def test_a_sample_too_short_alone_runs_dense_in_the_batch_too():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    q, k, v = qkv(2, 2, 2, 300, 32, torch.float64, g)
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[0, :150] = False  # 150 real tokens, below min_seq_len = 200
    module = layer("video_mme", min_seq_len=200)
    batched = hook(module, q, k, v, mask)
    dense = psa_kernels.dense_attention(q[:1, :, 150:], k[:1, :, 150:], v[:1, :, 150:], causal=True)
    torch.testing.assert_close(batched[0, 150:], dense[0].transpose(0, 1), atol=1e-12, rtol=0)
    state = getattr(module, runtime._STATE_ATTR)
    assert state.psa_calls == 1 and sum(state.dense_calls.values()) == 1
    assert any("min_seq_len" in reason for reason in state.dense_calls)


def test_masks_other_than_left_padding_are_read_as_they_are():
    padding = torch.ones(3, 10, dtype=torch.bool)
    padding[0, :4] = False
    assert attention._left_padding_starts(padding) == [4, 0, 0]
    padding[1, 5] = False  # a hole
    assert attention._left_padding_starts(padding) is None
    right = torch.ones(2, 10, dtype=torch.bool)
    right[0, 7:] = False
    assert attention._left_padding_starts(right) is None
    empty = torch.ones(2, 10, dtype=torch.bool)
    empty[0] = False
    assert attention._left_padding_starts(empty) == [10, 0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from psa_vlm import testing
    from psa_vlm.video import video_inputs

    path = testing.tiny_model_dir()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, attn_implementation="psa", dtype=torch.float32,
                                                               local_files_only=True).eval()
    clip = testing.make_video(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=16, width=224, height=224)
    settings = {**testing.TINY_VIDEO, "max_pixels": 224 * 224}
    questions = ["What happens?", "Which colour is the square in the middle of the clip, and where does it go?"]
    batch = video_inputs(processor, clip, questions, **settings)
    alone = [video_inputs(processor, clip, q, **settings) for q in questions]
    return model, batch, alone


@pytest.mark.parametrize("preset", ["video_mme", "fast"])
def test_a_models_answer_does_not_depend_on_its_batch(tiny, preset, monkeypatch):
    # The model on the blockwise path (the hook-level tests above cover every path); fp32.
    import psa_vlm

    monkeypatch.setattr(ops, "kernels_available", lambda device: False)
    model, batch, alone = tiny
    psa_vlm.configure(model, preset, block_q=64, block_k=32, min_seq_len=0)
    assert not batch["attention_mask"].bool().all(), "the two prompts should differ in length"
    with torch.no_grad():
        batched = model(**batch).logits
        assert psa_vlm.mean_sparsity(model) > 0
        for row, inputs in enumerate(alone):
            single = model(**inputs).logits[0]
            assert (batched[row, -single.shape[0]:] - single).abs().max().item() <= 1e-5
