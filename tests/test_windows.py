"""Batched vision-window attention (``psa_vlm.windows``) against one call per window."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import psa_vlm
from psa_vlm import testing, windows
from psa_vlm.video import video_inputs


def per_segment(q, k, v, lengths, scale):
    """The stock path: one SDPA call per segment, outputs concatenated -> [1, N, H, D]."""
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        outs.append(F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], scale=scale))
        start += n
    return torch.cat(outs, dim=2).transpose(1, 2)


def packed(N, H, D, seed):
    """q/k/v [1, H, N, D] as the vision tower makes them: transposes of a [N, H, D] tensor."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, H, D, generator=g).transpose(0, 1).unsqueeze(0) for _ in range(3)]


@pytest.mark.parametrize("chunk_tokens", [1 << 17, 40])
def test_segments_match_one_call_per_segment(chunk_tokens, monkeypatch):
    monkeypatch.setattr(windows, "CHUNK_TOKENS", chunk_tokens)  # 40: several chunks per length group
    lengths = [16, 16, 7, 16, 0, 7, 33, 16, 1, 33]  # interleaved lengths, an empty and a 1-token segment
    q, k, v = packed(sum(lengths), 5, 80, seed=int(torch.seed() % 2**31))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    seen = []

    def attend(qs, ks, vs):
        seen.append(tuple(qs.shape[:3]))
        return F.scaled_dot_product_attention(qs, ks, vs, scale=0.1).transpose(1, 2)

    out = windows.attend_segments(q, k, v, cu, attend)
    assert out.shape == (1, sum(lengths), 5, 80)
    torch.testing.assert_close(out, per_segment(q, k, v, lengths, 0.1), rtol=1e-5, atol=1e-5)
    assert sum(n for n, _, _ in seen) == 9  # every non-empty segment attended once
    if chunk_tokens > 1000:  # one batch per length
        assert sorted(seen) == [(1, 5, 1), (2, 5, 7), (2, 5, 33), (4, 5, 16)]


def test_bad_segments_are_refused():
    q, k, v = packed(10, 2, 16, seed=1)
    with pytest.raises(ValueError, match="covers 12 tokens"):
        windows.attend_segments(q, k, v, torch.tensor([0, 6, 12]), lambda *t: None)


def vision(model, inputs):
    with torch.no_grad():
        out = model.model.visual(inputs["pixel_values_videos"], grid_thw=inputs["video_grid_thw"])
    return out if torch.is_tensor(out) else out.pooler_output


def test_vision_tower_runs_one_call_per_layer_and_matches_sdpa(tiny_processor):
    processor = tiny_processor
    frames = testing.make_video_frames(8, 224, 168, seed=int(torch.seed() % 2**31))  # edge windows: two lengths
    inputs = video_inputs(processor, frames, "What colour?", **{**testing.TINY_VIDEO, "max_pixels": 224 * 168})
    sdpa = testing.build_tiny_model(seed=0, attn_implementation="sdpa")
    psa = testing.build_tiny_model(seed=0, attn_implementation="psa")
    psa_vlm.configure(psa, "video_mme")

    calls = []
    original = psa_vlm.attention.psa_attention_forward

    def counting(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return original(module, query, *args, **kwargs)

    from transformers import AttentionInterface

    AttentionInterface.register("psa", counting)
    try:
        out = vision(psa, inputs)
    finally:
        AttentionInterface.register("psa", original)
    torch.testing.assert_close(out, vision(sdpa, inputs), rtol=1e-5, atol=1e-5)
    depth = psa.config.vision_config.depth
    patches = int(inputs["video_grid_thw"].prod())
    assert calls == [patches] * depth, "one call per vision layer, over the whole sequence"
    windows_counted = sum(sum(s.dense_calls.values()) for s in psa_vlm.stats(psa) if s.tower == "vision")
    assert windows_counted > depth  # the statistics still count every window

    # Switched back to sdpa, the hook stands aside: the stock per-window loop runs.
    psa.set_attn_implementation("sdpa")
    psa_vlm.reset_stats(psa)
    torch.testing.assert_close(vision(psa, inputs), vision(sdpa, inputs), rtol=1e-6, atol=1e-6)
    assert all(not s.dense_calls for s in psa_vlm.stats(psa))


def test_an_unconfigured_model_batches_its_windows_from_the_second_forward(tiny_processor):
    processor = tiny_processor
    frames = testing.make_video_frames(4, 224, 224, seed=int(torch.seed() % 2**31))
    inputs = video_inputs(processor, frames, "What colour?", **{**testing.TINY_VIDEO, "max_pixels": 224 * 224})
    model = testing.build_tiny_model(seed=0, attn_implementation="psa")  # no psa_vlm.configure
    first = vision(model, inputs)
    attn = model.model.visual.blocks[0].attn
    assert getattr(attn, "_psa_segments_hook", None) is not None
    calls = []
    handle = attn.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["cu_seqlens"].numel()),
                                            with_kwargs=True)
    second = vision(model, inputs)
    handle.remove()
    assert calls == [2]  # the module saw one segment: [0, N]
    torch.testing.assert_close(second, first, rtol=1e-5, atol=1e-5)


def test_a_preset_on_the_vision_tower_runs_its_frame_groups_in_one_psa_call_per_length(monkeypatch, tiny_processor):
    """The dense preset puts PSA on the vision tower: every segment long enough for a block goes
    through the PSA path, and segments of one length go together (one mask generation and one
    attention launch per length and layer, not one per frame group); the result equals sdpa."""
    import psa_kernels

    processor = tiny_processor
    frames = testing.make_video_frames(8, 224, 224, seed=int(torch.seed() % 2**31))
    inputs = video_inputs(processor, frames, "What colour?", **{**testing.TINY_VIDEO, "max_pixels": 224 * 224})
    sdpa = testing.build_tiny_model(seed=0, attn_implementation="sdpa")
    psa = testing.build_tiny_model(seed=0, attn_implementation="psa")
    psa_vlm.configure(psa, "dense", block_q=64, block_k=32)
    launches = []
    real = psa_kernels.psa_attention
    monkeypatch.setattr(psa_kernels, "psa_attention", lambda q, *a, **kw: launches.append(q.shape[0]) or real(q, *a,
                                                                                                         **kw))
    out = vision(psa, inputs)
    torch.testing.assert_close(out, vision(sdpa, inputs), rtol=1e-4, atol=1e-4)
    groups = int(inputs["video_grid_thw"][0, 0])  # temporal patches: the full-attention segments
    full_layers = len(psa.config.vision_config.fullatt_block_indexes)
    assert groups > 1 and launches.count(groups) == full_layers  # one batched call per full-attention layer
    assert len(launches) == full_layers  # and no per-segment calls
    psa_calls = sum(s.psa_calls for s in psa_vlm.stats(psa) if s.tower == "vision")
    assert psa_calls == full_layers * groups  # the statistics count frame groups, not launches
