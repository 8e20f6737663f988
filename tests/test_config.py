"""PSAConfig, the shipped presets and their validation."""

from __future__ import annotations

import pytest

from psa_vlm.config import PSAConfig, available_presets, load_preset


def test_shipped_presets_load_and_the_paper_preset_has_the_paper_numbers():
    names = available_presets()
    assert {"video_mme", "fast", "block_sparse", "dense"} <= set(names)
    for name in names:
        assert load_preset(name).name == name
    paper = load_preset("video_mme")
    assert paper.mode == "energy" and paper.thresholds == (0.7, 0.8, 0.9, 0.9)
    assert paper.similarity == (0.75, 0.70, 0.70) and paper.stride == 8
    assert paper.block_q == paper.block_k == 128
    assert load_preset("block_sparse").levels == (1,)
    assert load_preset("dense").mode == "dense"
    fast = load_preset("fast")
    # The fast preset skips more: lower energy thresholds than the paper's.
    assert all(f <= p for f, p in zip(fast.thresholds, paper.thresholds))


def test_default_preset_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("PSA_VLM_PRESET", raising=False)
    assert load_preset(None).name == "video_mme"
    monkeypatch.setenv("PSA_VLM_PRESET", "fast")
    assert load_preset(None).name == "fast"


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ValueError) as err:
        load_preset("videomme")
    for name in available_presets():
        assert name in str(err.value)


def test_preset_from_a_yaml_path_and_per_layer_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "mode: quantile\nthresholds: [0.1, 0.2, 0.4, 0.6]\nblock_q: 64\nblock_k: 32\n"
        "overrides:\n  - tower: text\n    layers: [0, '2-3']\n    mode: dense\n"
        "  - tower: vision\n    min_seq_len: 0\n"
    )
    cfg = load_preset(path)
    assert cfg.name == "mine" and cfg.mode == "quantile" and cfg.block_k == 32
    assert [cfg.for_layer("text", i).mode for i in range(5)] == ["dense", "quantile", "dense", "dense", "quantile"]
    assert cfg.for_layer("vision", 0).mode == "quantile"
    assert cfg.for_layer("vision", 7).min_seq_len == 0 and cfg.for_layer("text", 7).min_seq_len == 8192
    assert load_preset(str(path)) == cfg


@pytest.mark.parametrize(
    "data, field",
    [
        ({"tresholds": [0.7, 0.8, 0.9, 0.9]}, "tresholds"),
        ({"thresholds": [0.9, 0.8, 0.9, 0.9]}, "thresholds"),
        ({"thresholds": [0.7, 0.8, 0.9, 1.5]}, "thresholds"),
        ({"thresholds": [0.7, 0.8]}, "thresholds"),
        ({"levels": [1, 3], "thresholds": [0.5, 0.9]}, "levels"),
        ({"levels": [2, 1], "thresholds": [0.5, 0.9]}, "levels"),
        ({"similarity": [0.75, 0.7]}, "similarity"),
        ({"similarity": [0.75, 0.7, -0.1]}, "similarity"),
        ({"mode": "topk"}, "mode"),
        ({"estimator": "xattn"}, "estimator"),
        ({"block_q": 96}, "block_q"),
        ({"block_k": 256}, "block_k"),
        ({"block_k": 32, "stride": 16, "block_q": 64}, None),
        ({"stride": 5}, "stride"),
        ({"min_seq_len": -1}, "min_seq_len"),
        ({"min_full_fraction": 2}, "min_full_fraction"),
        ({"budget_full_share": 1.5}, "budget_full_share"),
        ({"budget_full_share": -0.1}, "budget_full_share"),
        ({"budget_full_share": True}, "budget_full_share"),
        ({"budget_full_share": "half"}, "budget_full_share"),
        ({"towers": ["audio"]}, "towers"),
        ({"overrides": [{"layers": [0], "mode": "sparse"}]}, "mode"),
        ({"overrides": [{"layers": [0], "colour": 1}]}, "colour"),
        ({"overrides": [{"layers": ["x"], "mode": "dense"}]}, "layers"),
        ({"overrides": [{"tower": "audio", "mode": "dense"}]}, "tower"),
    ],
)
def test_invalid_configs_name_the_field(data, field):
    if field is None:  # a valid combination, for contrast
        PSAConfig.from_dict(data)
        return
    with pytest.raises(ValueError, match=f"'?{field}'?"):
        PSAConfig.from_dict(data)


def test_invalid_yaml_preset_names_the_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("block_k: 100\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*block_k.*\(32, 64, 128\)"):
        load_preset(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_preset(tmp_path / "missing.yaml")


def test_replace_validates_and_round_trips():
    cfg = load_preset("video_mme").replace(min_seq_len=0, block_q=64)
    assert cfg.min_seq_len == 0 and cfg.block_q == 64
    with pytest.raises(ValueError, match="block_q"):
        cfg.replace(block_q=7)
    with pytest.raises(ValueError, match="unknown field"):
        cfg.replace(blockq=64)
    assert PSAConfig.from_dict(load_preset("fast").to_dict()) == load_preset("fast")


def test_budget_mode_needs_a_target_and_at_sparsity_builds_it():
    from psa_vlm.config import PSAConfig, load_preset

    with pytest.raises(ValueError, match="target_sparsity"):
        PSAConfig(mode="budget")
    with pytest.raises(ValueError, match="target_sparsity"):
        PSAConfig(mode="budget", target_sparsity=1.0)
    with pytest.raises(ValueError, match="level 1"):
        PSAConfig(mode="budget", target_sparsity=0.5, levels=(2, 4), thresholds=(0.5, 0.9))
    cfg = load_preset("video_mme").at_sparsity(0.9, "budget")
    assert cfg.mode == "budget" and cfg.target_sparsity == 0.9 and cfg.similarity is None
    assert cfg.mask_kwargs()["target_sparsity"] == 0.9
    assert cfg.replace(levels=[1]).levels == (1,)  # budget mode: thresholds need not pair with levels
    # The share of the budget read at level 1 first: the kernels' default, passed to the mask.
    from psa_kernels.reference import BUDGET_FULL_SHARE

    assert cfg.budget_full_share == BUDGET_FULL_SHARE and cfg.mask_kwargs()["budget_full_share"] == BUDGET_FULL_SHARE
    assert cfg.replace(budget_full_share=0).mask_kwargs()["budget_full_share"] == 0
    assert cfg.replace(budget_full_share=1.0).budget_full_share == 1.0
    with pytest.raises(ValueError, match="policy"):
        load_preset("video_mme").at_sparsity(0.9, "greedy")


def test_one_override_parser_for_the_command_line_and_lm_eval():
    from psa_vlm.config import parse_overrides

    listed = parse_overrides(["towers=text,vision", "min_seq_len=0"])
    assert listed == parse_overrides("towers=text,vision;min_seq_len=0") == {"towers": ["text", "vision"],
                                                                            "min_seq_len": 0}
    assert parse_overrides({"block_q": 64}) == {"block_q": 64} and parse_overrides(None) == {}
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_overrides("min_seq_len")
    with pytest.raises(ValueError, match="not valid YAML"):
        parse_overrides(["thresholds=[0.5,"])


def test_one_label_scheme_for_every_attention_variant():
    from psa_vlm.variants import PSA_OFF, at_sparsities, parse_variants

    labels = ["sdpa", "eager", "psa", "psa:fast", PSA_OFF, *at_sparsities([0.9])]
    assert labels[5:] == ["psa@0.9", "binary@0.9", "budget@0.9", "topk@0.9"]
    chosen = parse_variants(labels, overrides={"min_seq_len": 0})
    assert chosen["sdpa"].config is None and chosen["eager"].attn == "eager" and chosen["psa"].attn == "psa"
    assert chosen["psa"].config.name == "video_mme" and chosen["psa:fast"].config.name == "fast"
    assert chosen[PSA_OFF].config.min_seq_len > 2**30
    assert chosen["psa@0.9"].config.mode == "quantile" and chosen["binary@0.9"].config.levels == (1,)
    assert chosen["budget@0.9"].config.mode == "budget" and chosen["topk@0.9"].config.levels == (1,)
    assert all(v.config.min_seq_len == 0 for k, v in chosen.items() if v.config is not None and k != PSA_OFF)
    for bad, message in (("sdpa:fast", "only psa takes a preset"), ("psa@x", "unknown attention"),
                         ("psa,psa:video_mme", "repeat"), ("", "no attention")):
        with pytest.raises(ValueError, match=message):
            parse_variants(bad)
