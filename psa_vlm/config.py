"""PSA configuration: the :class:`PSAConfig` dataclass and the YAML presets in ``configs/``.

A preset names every knob of mask generation (docs/semantics.md section 7) plus where PSA runs
at all (which towers, from which sequence length) and per-layer overrides, e.g. "keep the first
two text layers dense". Presets are selected by name (``"video_mme"``) or by a path to a YAML
file; :func:`load_preset` validates them and raises ``ValueError`` naming the bad field.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

MODES = ("energy", "quantile", "budget", "dense")
ESTIMATORS = ("antidiagonal", "sampled")
ESTIMATE_PRECISIONS = ("full", "fp8")
POOL_LEVELS = (1, 2, 4, 8)
# Tile sizes the kernels take (issue: block_q 64/128, logical block_k 32/64/128).
BLOCK_Q_SIZES = (64, 128)
BLOCK_K_SIZES = (32, 64, 128)
STRIDES = (4, 8, 16)
TOWERS = ("text", "vision")
DEFAULT_PRESET = "video_mme"
#: Environment variable naming the preset used when a model was not configured explicitly.
PRESET_ENV = "PSA_VLM_PRESET"


@dataclass(frozen=True)
class LayerOverride:
    """Field values that replace the preset's for some layers of one tower (or both)."""

    tower: str = "all"  # "text", "vision" or "all"
    layers: tuple[int, ...] | None = None  # None = every layer of the tower
    values: tuple[tuple[str, Any], ...] = ()

    def matches(self, tower: str, layer: int | None) -> bool:
        if self.tower not in ("all", tower):
            return False
        return self.layers is None or (layer is not None and layer in self.layers)


@dataclass(frozen=True)
class PSAConfig:
    """Everything that decides how one attention call is sparsified.

    Fields mirror docs/semantics.md section 7: ``mode`` (``energy`` mass thresholds, ``quantile``
    rank thresholds, ``budget``: the levels that keep the most attention for the FLOPs of
    ``target_sparsity``, or ``dense``: every pair at level 1), ``levels`` and one threshold per
    level (unused by ``budget``),
    ``similarity`` (cap thresholds for p = 2, 4, 8; ``None`` disables the cap), the importance
    ``estimator``, its ``stride`` and ``estimate_precision`` (``fp8``: the antidiagonal logits
    from fp8 copies of Q and K, half the bytes of bf16), block sizes, ``min_full_fraction`` (level-1 blocks kept per
    row) and ``dense_tail_tokens`` (tokens treated as text when text positions are unknown).
    ``budget_full_share`` (mode ``budget``; default 0.5, a number in [0, 1]): the share of each
    row's budget (after its forced blocks) first spent on reading its top-ranked blocks at full
    resolution, in rank order as binary top-k would (only blocks above the mean importance of
    the row's unforced blocks; at least one when the budget allows one); the optimiser spends
    the rest. 0 leaves everything to the optimiser, which pooled a needle's block away at high
    sparsity; 1 is close to top-k (docs/semantics.md section 7, step 3; docs/quality.md).
    ``share_kv_group`` builds one level map per kv head instead of per query head.
    ``dense_text`` (default true) keeps every block holding text at level 1 (section 7, step 5);
    false forces no text block, as if the caller knew of no text: a stress setting for
    measurements (the question's rows are then sparse too), not for serving.
    ``media_gap_tokens``: a run of at most this many text tokens with media tokens on both
    sides (the separators and timestamps between a video's frames) counts as part of the
    media, not as text to force (0: every text token is text; docs/semantics.md section 10).
    PSA runs only on ``towers`` and for keys of at least ``min_seq_len`` tokens; elsewhere
    attention is dense.
    """

    name: str = "custom"
    description: str = ""
    mode: str = "energy"
    levels: tuple[int, ...] = (1, 2, 4, 8)
    thresholds: tuple[float, ...] = (0.7, 0.8, 0.9, 0.9)
    similarity: tuple[float, float, float] | None = (0.75, 0.70, 0.70)
    estimator: str = "antidiagonal"
    stride: int = 8
    estimate_precision: str = "full"
    target_sparsity: float | None = None
    budget_full_share: float = 0.5
    block_q: int = 128
    block_k: int = 128
    min_seq_len: int = 8192  # the H200 break-even of the whole call (docs/performance.md)
    min_full_fraction: float = 0.06
    dense_tail_tokens: int = 512
    share_kv_group: bool = False
    dense_text: bool = True
    media_gap_tokens: int = 32  # Qwen3-VL's "<12.5 seconds>" between two frames: about 10 tokens
    towers: tuple[str, ...] = ("text",)
    overrides: tuple[LayerOverride, ...] = field(default=())

    def __post_init__(self):
        _validate(self)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> "PSAConfig":
        """Build from plain data (a parsed YAML file); unknown keys raise ``ValueError``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: a preset must be a mapping of fields, got {type(data).__name__}")
        _check_keys(data, _FIELDS, source)
        values = {key: _coerce(key, value, source) for key, value in data.items() if key != "overrides"}
        values["overrides"] = tuple(
            _parse_override(item, f"{source}: overrides[{i}]") for i, item in enumerate(data.get("overrides") or ())
        )
        try:
            return cls(**values)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    def replace(self, **changes) -> "PSAConfig":
        """A validated copy with some fields changed (``overrides`` as a list of dicts or objects)."""
        _check_keys(changes, _FIELDS, f"preset {self.name!r}")
        if "overrides" in changes:
            changes["overrides"] = tuple(
                o if isinstance(o, LayerOverride) else _parse_override(o, f"overrides[{i}]")
                for i, o in enumerate(changes["overrides"] or ())
            )
        changes = {k: (_coerce(k, v, "replace") if k != "overrides" else v) for k, v in changes.items()}
        return dataclasses.replace(self, **changes)

    def at_sparsity(self, sparsity: float, policy: str = "quantile") -> "PSAConfig":
        """A copy that reads ``1 - sparsity`` of the dense FLOPs (before forced blocks), without
        the similarity cap and per-layer overrides.

        ``policy="quantile"``: fixed level fractions 1:1:1:2 for p = 1, 2, 4, 8 (quantile mode).
        ``policy="budget"``: the budget-aware assignment (``mode: budget``) at that sparsity: per
        row, the levels that keep the most attention for the FLOPs.

        The cost of PSA depends on the level map, not on the values: this reproduces the cost a
        real model reaches (e.g. the paper's 0.65 on Video-MME) on random weights, whose
        attention is too flat for the energy thresholds to skip much.
        """
        if self.levels != (1, 2, 4, 8):
            raise ValueError(f"at_sparsity needs levels [1, 2, 4, 8], preset {self.name!r} has {list(self.levels)}")
        if policy == "budget":
            return self.replace(name=f"{self.name}@budget{sparsity:g}", mode="budget", target_sparsity=sparsity,
                                similarity=None, overrides=())
        if policy != "quantile":
            raise ValueError(f"policy must be 'quantile' or 'budget', got {policy!r}")
        return self.replace(name=f"{self.name}@{sparsity:g}", mode="quantile",
                            thresholds=quantile_thresholds(sparsity), similarity=None, overrides=())

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["overrides"] = [
            {"tower": o.tower, **({"layers": list(o.layers)} if o.layers is not None else {}), **dict(o.values)}
            for o in self.overrides
        ]
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    # -- use -------------------------------------------------------------------------------

    @functools.lru_cache(maxsize=None)
    def for_layer(self, tower: str, layer: int | None) -> "PSAConfig":
        """The settings in force for one layer: the preset with its matching overrides applied
        in order (later ones win). The result has no overrides of its own."""
        values: dict[str, Any] = {}
        for override in self.overrides:
            if override.matches(tower, layer):
                values.update(override.values)
        return dataclasses.replace(self, overrides=(), **values)

    def runs_on(self, tower: str) -> bool:
        return tower in self.towers

    def mask_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`psa_kernels.build_level_map` for this config."""
        return dict(
            block_q=self.block_q,
            block_k=self.block_k,
            mode=self.mode,
            levels=self.levels,
            thresholds=self.thresholds,
            similarity=self.similarity,
            estimator=self.estimator,
            stride=self.stride,
            estimate_precision=self.estimate_precision,
            target_sparsity=self.target_sparsity,
            budget_full_share=self.budget_full_share,
            dense_tail_tokens=self.dense_tail_tokens,
            min_full_fraction=self.min_full_fraction,
            share_kv_group=self.share_kv_group,
        )


_FIELDS = tuple(f.name for f in dataclasses.fields(PSAConfig))
# Fields an override may change: everything that shapes one call, not the preset's identity.
_OVERRIDABLE = tuple(f for f in _FIELDS if f not in ("name", "description", "overrides", "towers"))


def _check_keys(data: Mapping[str, Any], allowed: tuple[str, ...], source: str) -> None:
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown}; allowed fields: {', '.join(allowed)}")


def _coerce(key: str, value: Any, source: str) -> Any:
    """YAML gives lists; the frozen dataclass keeps tuples (hashable, so configs can be cached)."""
    if key in ("levels", "thresholds", "similarity", "towers") and isinstance(value, list):
        return tuple(value)
    return value


def _parse_layers(spec: Any, source: str) -> tuple[int, ...] | None:
    """``all`` / a list of ints / ``"a-b"`` ranges (inclusive), e.g. ``[0, 1]`` or ``"0-3"``."""
    if spec is None or spec == "all":
        return None
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    layers: list[int] = []
    for item in items:
        if isinstance(item, bool):
            item = None
        if isinstance(item, int) and item >= 0:
            layers.append(item)
        elif isinstance(item, str) and item.count("-") == 1 and all(p.strip().isdigit() for p in item.split("-")):
            lo, hi = (int(p) for p in item.split("-"))
            if lo > hi:
                raise ValueError(f"{source}: field 'layers': empty range {item!r}")
            layers.extend(range(lo, hi + 1))
        else:
            raise ValueError(
                f"{source}: field 'layers': expected 'all', non-negative ints or 'a-b' ranges, got {item!r}"
            )
    return tuple(sorted(set(layers)))


def _parse_override(item: Any, source: str) -> LayerOverride:
    if isinstance(item, LayerOverride):
        return item
    if not isinstance(item, Mapping):
        raise ValueError(f"{source}: an override must be a mapping, got {type(item).__name__}")
    _check_keys(item, ("tower", "layers", *_OVERRIDABLE), source)
    tower = item.get("tower", "all")
    if tower not in ("all", *TOWERS):
        raise ValueError(f"{source}: field 'tower' must be one of {('all', *TOWERS)}, got {tower!r}")
    values = tuple(
        (k, _coerce(k, v, source)) for k, v in item.items() if k not in ("tower", "layers")
    )
    if not values:
        raise ValueError(f"{source}: an override must change at least one of: {', '.join(_OVERRIDABLE)}")
    override = LayerOverride(tower=tower, layers=_parse_layers(item.get("layers"), source), values=values)
    # Validate the values now, against the defaults, so a bad override fails at load time.
    try:
        dataclasses.replace(PSAConfig(), **dict(values))
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    return override


def _fail(name: str, message: str, value: Any) -> None:
    raise ValueError(f"field {name!r}: {message}, got {value!r}")


def _validate(c: PSAConfig) -> None:
    if c.mode not in MODES:
        _fail("mode", f"must be one of {MODES}", c.mode)
    levels = c.levels
    if not isinstance(levels, tuple) or not levels or any(lvl not in POOL_LEVELS for lvl in levels):
        _fail("levels", f"must be a non-empty list of pooling factors from {POOL_LEVELS}", levels)
    if list(levels) != sorted(set(levels)):
        _fail("levels", "must be strictly increasing", levels)
    th = c.thresholds
    if not isinstance(th, tuple) or (len(th) != len(levels) and c.mode != "budget"):  # budget: unused
        _fail("thresholds", f"must hold one value per level ({len(levels)})", th)
    if any(isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0 for t in th):
        _fail("thresholds", "values must be numbers in [0, 1]", th)
    if list(th) != sorted(th):
        _fail("thresholds", "must be non-decreasing (finer levels take the most important mass first)", th)
    if c.similarity is not None:
        sim = c.similarity
        if not isinstance(sim, tuple) or len(sim) != 3:
            _fail("similarity", "must be null or three thresholds for p = 2, 4, 8", sim)
        if any(isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0 for t in sim):
            _fail("similarity", "values must be numbers in [0, 1]", sim)
    if c.estimator not in ESTIMATORS:
        _fail("estimator", f"must be one of {ESTIMATORS}", c.estimator)
    ts = c.target_sparsity
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, (int, float)) or not 0.0 <= ts < 1.0):
        _fail("target_sparsity", "must be null or a number in [0, 1)", ts)
    if c.mode == "budget" and ts is None:
        _fail("target_sparsity", "mode 'budget' needs a target sparsity (the FLOPs it may spend: 1 - target)", ts)
    if c.mode == "budget" and 1 not in c.levels:
        _fail("levels", "mode 'budget' needs level 1 among the levels", c.levels)
    share = c.budget_full_share
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
        _fail("budget_full_share", "must be a number in [0, 1] (the share of the budget read at level 1 first)", share)
    if c.estimate_precision not in ESTIMATE_PRECISIONS:
        _fail("estimate_precision", f"must be one of {ESTIMATE_PRECISIONS}", c.estimate_precision)
    if c.stride not in STRIDES:
        _fail("stride", f"must be one of {STRIDES}", c.stride)
    if c.block_q not in BLOCK_Q_SIZES:
        _fail("block_q", f"must be one of {BLOCK_Q_SIZES} (the query tiles the kernels take)", c.block_q)
    if c.block_k not in BLOCK_K_SIZES:
        _fail("block_k", f"must be one of {BLOCK_K_SIZES} (the key blocks the kernels take)", c.block_k)
    if c.block_q % c.stride or c.block_k % c.stride:
        _fail("stride", f"must divide block_q ({c.block_q}) and block_k ({c.block_k})", c.stride)
    for name in ("min_seq_len", "dense_tail_tokens", "media_gap_tokens"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            _fail(name, "must be a non-negative int", value)
    frac = c.min_full_fraction
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= frac <= 1.0:
        _fail("min_full_fraction", "must be a number in [0, 1]", frac)
    for name in ("share_kv_group", "dense_text"):
        if not isinstance(getattr(c, name), bool):
            _fail(name, "must be true or false", getattr(c, name))
    if not isinstance(c.towers, tuple) or any(t not in TOWERS for t in c.towers):
        _fail("towers", f"must be a list drawn from {TOWERS}", c.towers)
    if not isinstance(c.name, str) or not isinstance(c.description, str):
        _fail("name", "name and description must be strings", (c.name, c.description))


#: Fields holding lists: an override may give them as a comma list (``towers=text,vision``).
LIST_FIELDS = ("towers", "levels", "thresholds", "similarity")


def parse_overrides(items) -> dict[str, Any]:
    """Preset overrides from ``FIELD=VALUE`` pairs: a list of them (``--override`` on the command
    line), one string of them separated by ``;`` (lm-eval's ``model_args``), or a mapping (as is).
    VALUE is YAML (``0``, ``true``, ``null``, ``[1, 2]``); a list field also takes a comma list or
    a single item (``towers=text,vision``; ``towers=vision``). Field names and values are
    validated when the overrides are applied (:meth:`PSAConfig.replace`)."""
    if not items:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    if isinstance(items, str):
        items = [item for item in items.split(";") if item.strip()]
    out: dict[str, Any] = {}
    for item in items:
        field, sep, value = item.partition("=")
        field = field.strip()
        if not sep or not field:
            raise ValueError(f"an override takes FIELD=VALUE (e.g. min_seq_len=0), got {item!r}")
        listed = field in LIST_FIELDS and not value.strip().startswith("[")
        try:  # a comma list is a YAML flow list without its brackets
            parsed = yaml.safe_load(f"[{value}]" if listed else value)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"override {item!r}: the value is not valid YAML ({problem})") from None
        out[field] = None if listed and parsed == [None] else parsed  # similarity=null turns the cap off
    return out


def quantile_thresholds(sparsity: float) -> tuple[float, float, float, float]:
    """Quantile thresholds for levels (1, 2, 4, 8) that read ``1 - sparsity`` of the dense FLOPs
    (forced blocks aside): level fractions c:c:c:2c; when those do not fit in a row, c:c:c:rest;
    at the lowest sparsities (below about 0.42) level 1 and level 2 only."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    rho = 1.0 - sparsity
    c = rho / 2  # density of c*(1, 1, 1, 2) = c * (1 + 1/2 + 1/4 + 2/8) = 2c
    if 5 * c <= 1:
        return (c, 2 * c, 3 * c, 5 * c)
    c = (rho - 0.125) / 1.375  # c + c/2 + c/4 + (1 - 3c)/8
    if 3 * c <= 1:
        return (c, 2 * c, 3 * c, 1.0)
    a = 2 * rho - 1  # a + (1 - a)/2
    return (a, 1.0, 1.0, 1.0)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def _preset_dir():
    try:
        return resources.files("psa_vlm.presets")
    except ModuleNotFoundError:  # psa_vlm imported from a source tree that was not installed
        return Path(__file__).resolve().parent.parent / "configs"


def available_presets() -> list[str]:
    """Names of the presets shipped in ``configs/``."""
    return sorted(p.name[: -len(".yaml")] for p in _preset_dir().iterdir() if p.name.endswith(".yaml"))


def load_preset(preset: "str | os.PathLike | PSAConfig | Mapping[str, Any] | None" = None) -> PSAConfig:
    """A :class:`PSAConfig` from a preset name, a YAML path, a mapping, or a config (returned as is).

    ``None`` gives the preset named by ``$PSA_VLM_PRESET``, else ``video_mme``.
    """
    if isinstance(preset, PSAConfig):
        return preset
    if isinstance(preset, Mapping):
        return PSAConfig.from_dict(preset)
    if preset is None:
        preset = os.environ.get(PRESET_ENV) or DEFAULT_PRESET
    text = str(preset)
    path = Path(text).expanduser()
    if text.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ValueError(f"preset file {text!r} does not exist")
        return _load_file(path.read_text(), str(path), default_name=path.stem)
    names = available_presets()
    if text not in names:
        raise ValueError(f"unknown preset {text!r}; available presets: {', '.join(names)} (or a path to a .yaml file)")
    return _load_file((_preset_dir() / f"{text}.yaml").read_text(), f"preset {text!r}", default_name=text)


def _load_file(text: str, source: str, default_name: str) -> PSAConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{source}: not valid YAML: {err}") from None
    data = dict(data or {})
    data.setdefault("name", default_name)
    return PSAConfig.from_dict(data, source=source)
