"""Scenarios: frozen attrs config classes loaded from TOML, with ``--set dotted.key=value`` overrides.

A scenario names a model and a hardware profile from the catalogs, where the full expert set lives
(``placement``), the expert caches, the prefetcher, the workload and energy overrides. Loading is side-effect
free; every problem is a :class:`TierflowError` of one line that lists the valid keys or values.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from tierflow.errors import TierflowError
from tierflow.resources import scenarios_dir, traces_dir

PLACEMENTS = ("hbm", "ddr", "ssd")
SCOPES = ("global", "per-layer")
# The scenario sections with a plugin and its free-form ``params`` (which may name files it reads).
PLUGIN_SECTIONS = ("cache", "ddr_cache", "prefetch")
KV_SPLITS = ("heads", "even")  # how a tensor-parallel group splits its KV cache (sim.gpu.kv_layout)
ROUTINGS = ("trace", "uniform")
EXPERT_COPIES = ("on_demand", "ahead")


def _help(text: str) -> dict:
    return {"help": text}


def _non_negative(instance, attribute, value):
    if value is not None and value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


def _positive(instance, attribute, value):
    if value is not None and value <= 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


def _each_positive(instance, attribute, value):
    if value is not None and not all(item > 0 for item in value):
        raise ValueError(f"{attribute.name} must hold numbers > 0, got {list(value)}")


def _one_of(choices):
    def check(instance, attribute, value):
        if value not in choices:
            raise ValueError(f"{attribute.name} must be one of {', '.join(choices)}; got {value!r}")

    return check


# Every GPU is simulated with its own caches, drive and link: a bound that keeps a typo from building a billion.
MAX_GPUS = 65536


def _gpu_count(instance, attribute, value):
    if not 1 <= value <= MAX_GPUS:
        raise ValueError(f"gpus must be between 1 and {MAX_GPUS} (each GPU is simulated with its own caches, "
                         f"drive and link); got {value}")


def _divides_gpus(scenario, tp: int | None) -> None:
    if tp is not None and scenario.gpus % tp:
        raise ValueError(f"attention_tp must divide gpus = {scenario.gpus}; got {tp}")


@attrs.frozen
class WorkloadConfig:
    trace: str = attrs.field(default="", metadata=_help("trace file (HDF5); empty: a built-in synthetic trace"))
    batch_size: int = attrs.field(default=1, validator=_positive, metadata=_help("sequences decoded together"))
    decode_tokens: int = attrs.field(default=256, validator=_positive,
                                     metadata=_help("decode steps to simulate (each yields batch_size tokens)"))
    context_length: int = attrs.field(default=1024, validator=_non_negative,
                                      metadata=_help("tokens already in each sequence's KV cache at the first step"))
    synthetic_sequences: int = attrs.field(default=0, validator=_non_negative,
                                           metadata=_help("sequences in the built-in trace (at least 3 x batch_size)"))
    skip_tokens: int = attrs.field(default=0, validator=_non_negative,
                                   metadata=_help("decode steps per sequence to skip (cache warm-up is not skipped)"))
    routing: str = attrs.field(default="trace", validator=_one_of(ROUTINGS),
                               metadata=_help("trace: the trace's (or the built-in generator's) routing; uniform: "
                                              "every token picks top-k experts uniformly at random"))

    def __attrs_post_init__(self):
        from tierflow.workload import SYNTHETIC_TOKENS_RULE, synthetic_token_count

        if self.routing == "uniform" and self.skip_tokens:
            raise ValueError(f"skip_tokens = {self.skip_tokens} has no effect with workload.routing = 'uniform' "
                             "(its tokens are independent draws); set workload.skip_tokens = 0")
        tokens = synthetic_token_count(self.batch_size, self.decode_tokens, self.skip_tokens, self.synthetic_sequences)
        if not self.trace and self.routing == "trace" and self.synthetic_sequences > tokens:  # each needs a token
            raise ValueError(f"synthetic_sequences = {self.synthetic_sequences} exceeds the {tokens} tokens of the "
                             f"built-in trace ({SYNTHETIC_TOKENS_RULE})")


@attrs.frozen
class CacheConfig:
    policy: str = attrs.field(default="lru", metadata=_help("eviction policy (see `tierflow plugins`)"))
    capacity_experts: int | None = attrs.field(default=None, validator=_non_negative,
                                               metadata=_help("experts the cache holds; unset: all free memory"))
    capacity_bytes: int | None = attrs.field(default=None, validator=_non_negative,
                                             metadata=_help("bytes the cache holds (instead of capacity_experts)"))
    layer_slots: tuple | None = attrs.field(default=None, validator=_each_positive, metadata=_help(
        "per-layer scope: the slots of each MoE layer, one number per layer (instead of capacity_experts)"))
    scope: str = attrs.field(default="global", validator=_one_of(SCOPES),
                             metadata=_help("one pool for all layers, or fixed slots per layer"))
    params: dict = attrs.field(factory=dict, metadata=_help("policy parameters"))
    enabled: bool = attrs.field(default=True, metadata=_help("false: no reuse, every expert fetched every step"))

    def __attrs_post_init__(self):
        _one_capacity(self)
        if self.layer_slots is not None:
            if self.scope != "per-layer":
                raise ValueError("layer_slots needs scope = 'per-layer' (a global pool takes capacity_experts)")
            if self.capacity_experts is not None or self.capacity_bytes is not None:
                raise ValueError("layer_slots: set layer_slots or capacity_experts / capacity_bytes, not both (in a "
                                 "sweep file, set the scenario's other key to \"none\")")


@attrs.frozen
class DdrCacheConfig:
    enabled: bool = attrs.field(default=False, metadata=_help("a DDR expert cache between SSD and HBM"))
    policy: str = attrs.field(default="lru", metadata=_help("eviction policy of the DDR cache"))
    capacity_experts: int | None = attrs.field(default=None, validator=_non_negative,
                                               metadata=_help("experts the DDR cache holds; unset: the DDR tier"))
    capacity_bytes: int | None = attrs.field(default=None, validator=_non_negative,
                                             metadata=_help("bytes the DDR cache holds"))
    params: dict = attrs.field(factory=dict, metadata=_help("policy parameters"))

    def __attrs_post_init__(self):
        _one_capacity(self)


def _one_capacity(cache) -> None:
    """An enabled cache is sized one way (``--set`` of one key unsets the other; a sweep sets the other to
    "none")."""
    if cache.enabled and cache.capacity_experts is not None and cache.capacity_bytes is not None:
        raise ValueError("capacity_bytes: set capacity_experts or capacity_bytes, not both")


@attrs.frozen
class PrefetchConfig:
    policy: str = attrs.field(default="none", metadata=_help("prefetcher (see `tierflow plugins`)"))
    lookahead: int = attrs.field(default=1, validator=_positive, metadata=_help("layers ahead to prefetch for"))
    budget_experts: int = attrs.field(default=16, validator=[_non_negative, attrs.validators.le(2**63 - 1)],
                                      metadata=_help("most experts prefetched per routing event"))
    max_queued: int = attrs.field(default=2, validator=_positive,
                                  metadata=_help("hold a prefetch back while its source already has this many queued; "
                                                 "it is offered again when the queue drains"))
    preempt: bool = attrs.field(default=True, metadata=_help(
        "a demand miss takes a link or drive over from a prefetch in service at its next 4 MiB chunk, or at once "
        "while the prefetch's bytes have not begun to flow (the prefetch resumes after); false: a transfer in "
        "service always finishes first"))
    params: dict = attrs.field(factory=dict, metadata=_help("prefetcher parameters"))


@attrs.frozen
class TimingConfig:
    """How expert copies meet compute. The defaults are the simulator's own model; the alternatives are the
    idealisations of analytical studies (Kyung et al., CAL 2025), each a setting of its own."""

    expert_copies: str = attrs.field(
        default="on_demand", validator=_one_of(EXPERT_COPIES),
        metadata=_help("on_demand: a layer fetches its missing experts when it reaches them (plus what the "
                       "prefetcher asks for); ahead: at each step's first MoE layer every layer's copies are "
                       "queued in layer order, an ideal prefetch that overlaps copying with all compute (needs "
                       "cache.enabled = false)"))
    offload_takes_hbm_bandwidth: bool = attrs.field(
        default=False,
        metadata=_help("true: compute sees the HBM bandwidth minus the offload link's bandwidth while copies run "
                       "beside it (their writes into HBM compete with compute's reads): in every phase with "
                       "expert_copies = 'ahead' (the paper's continuous stream), else in phases that start while a "
                       "copy is in flight"))


@attrs.frozen
class EnergyConfig:
    """Overrides of the hardware profile's energy figures; unset keeps the profile's cited value."""

    hbm_read_pj_per_bit: float | None = attrs.field(default=None, validator=_non_negative)
    hbm_write_pj_per_bit: float | None = attrs.field(default=None, validator=_non_negative)
    ddr_read_pj_per_bit: float | None = attrs.field(default=None, validator=_non_negative)
    ddr_write_pj_per_bit: float | None = attrs.field(default=None, validator=_non_negative)
    ssd_read_pj_per_bit: float | None = attrs.field(default=None, validator=_non_negative)
    link_pj_per_bit: float | None = attrs.field(default=None, validator=_non_negative)
    pj_per_flop: float | None = attrs.field(default=None, validator=_non_negative)
    gpu_static_w: float | None = attrs.field(default=None, validator=_non_negative)
    ddr_static_w: float | None = attrs.field(default=None, validator=_non_negative)
    ssd_static_w: float | None = attrs.field(default=None, validator=_non_negative)
    l1_pj_per_bit: float | None = attrs.field(default=None, validator=_non_negative)
    l2_pj_per_bit: float | None = attrs.field(default=None, validator=_non_negative)


@attrs.frozen
class Scenario:
    name: str = attrs.field(default="custom", metadata=_help("scenario name, shown in results"))
    description: str = attrs.field(default="", metadata=_help("one line on what the scenario models"))
    model: str = attrs.field(default="deepseek-r1", metadata=_help("catalog model (`tierflow catalog models`)"))
    hardware: str = attrs.field(default="h100-pcie5", metadata=_help("hardware profile (`tierflow catalog hardware`)"))
    placement: str = attrs.field(default="ssd", validator=_one_of(PLACEMENTS),
                                 metadata=_help("where the full expert set lives"))
    seed: int = attrs.field(default=0, validator=[_non_negative, attrs.validators.le(2**63 - 1)],
                            metadata=_help("seed of the built-in trace (synthetic or uniform routing) and of the "
                                           "oracle prefetcher's wrong guesses (unless prefetch.params.seed is set)"))
    gpus: int = attrs.field(default=1, validator=_gpu_count,
                            metadata=_help("GPUs: attention tensor-parallel, experts expert-parallel over all"))
    attention_tp: int | None = attrs.field(
        default=None, validator=[_positive, lambda scenario, attribute, value: _divides_gpus(scenario, value)],
        metadata=_help("GPUs per tensor-parallel group of attention and dense layers; gpus / attention_tp groups "
                       "split the batch (data parallel); unset: all gpus"))
    kv_split: str = attrs.field(
        default="heads", validator=_one_of(KV_SPLITS),
        metadata=_help("how a tensor-parallel group splits its KV cache: by KV heads (heads fewer than the group's "
                       "GPUs, and MLA's one latent, are replicated) or evenly (the seed paper's reproduction)"))
    workload: WorkloadConfig = attrs.field(factory=WorkloadConfig)
    cache: CacheConfig = attrs.field(factory=CacheConfig)
    ddr_cache: DdrCacheConfig = attrs.field(factory=DdrCacheConfig)
    prefetch: PrefetchConfig = attrs.field(factory=PrefetchConfig)
    timing: TimingConfig = attrs.field(factory=TimingConfig)
    energy: EnergyConfig = attrs.field(factory=EnergyConfig)

    def __attrs_post_init__(self):
        # With every copy streamed ahead and no cache there is nothing for a prefetcher to fill.
        if self.timing.expert_copies == "ahead" and not self.cache.enabled and self.prefetch.policy != "none":
            raise ValueError(f"prefetch.policy = {self.prefetch.policy!r} has no effect with timing.expert_copies = "
                             "'ahead' and cache.enabled = false (every expert is copied ahead, nothing is cached); "
                             "set prefetch.policy = 'none'")
        # Prefetches land in the HBM expert cache; without one (experts off the GPU) they would be dropped. With
        # placement = 'hbm' every expert is resident and a prefetcher is simply left out, so a sweep over
        # placements can set one for all its points.
        if not self.cache.enabled and self.prefetch.policy != "none" and self.placement != "hbm":
            raise ValueError(f"prefetch.policy = {self.prefetch.policy!r} has no effect with cache.enabled = false "
                             "(prefetched experts land in the HBM expert cache); set cache.enabled = true or "
                             "prefetch.policy = 'none'")


_SECTIONS = {
    "workload": WorkloadConfig,
    "cache": CacheConfig,
    "ddr_cache": DdrCacheConfig,
    "prefetch": PrefetchConfig,
    "timing": TimingConfig,
    "energy": EnergyConfig,
}
# The ways to size a cache (cache, ddr_cache); setting one with --set unsets the others.
_CAPACITY_KEYS = ("capacity_experts", "capacity_bytes", "layer_slots")


def valid_keys() -> list[str]:
    """Every dotted key a scenario accepts."""
    keys = []
    for field in attrs.fields(Scenario):
        if field.name in _SECTIONS:
            keys += [f"{field.name}.{f.name}" for f in attrs.fields(_SECTIONS[field.name])]
        else:
            keys.append(field.name)
    return keys


def _check_finite(key: str, value: Any) -> None:
    """NaN and infinity are no setting, nor is a NUL character in text (no file name holds one, and the HDF5
    outputs cannot store it): reject them anywhere, plugin parameter tables included."""
    if isinstance(value, float) and not math.isfinite(value):
        raise TierflowError(f"scenario key {key}: must be a finite number, got {value}")
    if isinstance(value, str) and "\0" in value:
        raise TierflowError(f"scenario key {key}: a NUL character is not allowed in text, got {value!r}")
    if isinstance(value, Mapping):
        for inner_key, inner in value.items():
            _check_finite(f"{key}.{inner_key}", inner)
    elif isinstance(value, list):
        for inner in value:
            _check_finite(key, inner)


def _coerce(key: str, field: attrs.Attribute, value: Any) -> Any:
    _check_finite(key, value)
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    kind = kind.replace(" ", "")
    optional = "None" in kind
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))):
        return None  # an optional number left empty or "none": unset
    if kind.startswith("bool"):
        if isinstance(value, bool):
            return value
    elif kind.startswith("int"):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:  # 1e300 is no count
            return int(value)
    elif kind.startswith("float"):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind.startswith("str"):
        if isinstance(value, str):
            return value
    elif kind.startswith("dict"):
        if isinstance(value, Mapping):
            return dict(value)
    elif kind.startswith("tuple"):  # a list of whole numbers
        if isinstance(value, (list, tuple)) and value and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
        raise TierflowError(f"scenario key {key}: expected a non-empty list of whole numbers (in --set, a TOML "
                            f"list: {key}=[b0, b1, ...]), got {value!r}")
    expected = kind.split("|")[0]
    raise TierflowError(f"scenario key {key}: expected {expected}, got {value!r}")


def _build(cls, table: Mapping[str, Any], prefix: str):
    fields = attrs.fields_dict(cls)
    values = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise TierflowError(f"unknown scenario key {dotted!r}; valid keys: {', '.join(valid_keys())}")
        field = fields[key]
        if key in _SECTIONS and cls is Scenario:
            if not isinstance(value, Mapping):
                raise TierflowError(f"scenario key {dotted}: expected a table, got {value!r}")
            values[key] = _build(_SECTIONS[key], value, f"{dotted}.")
        else:
            values[key] = _coerce(dotted, field, value)
    try:
        return cls(**values)
    except ValueError as error:
        raise TierflowError(f"scenario key {prefix}{error}") from None


def parse_value(raw: str) -> Any:
    """A ``--set`` value as TOML would read it (numbers, booleans, strings, arrays); bare words are strings."""
    try:
        return tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_overrides(table: dict, overrides: Iterable[str]) -> dict:
    """Merge ``dotted.key=value`` strings into a nested scenario table (a new dict)."""
    merged = {k: dict(v) if isinstance(v, Mapping) else v for k, v in table.items()}
    overrides = list(overrides)
    given = {item.partition("=")[0].strip() for item in overrides}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise TierflowError(f"--set {item!r}: expected dotted.key=value")
        parts = key.split(".")
        node = merged
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                prefix = ".".join(parts[: depth + 1])
                if prefix not in given:  # the scenario file's own value is wrong, whatever --set says
                    raise TierflowError(f"scenario key {prefix}: expected a table, got {child!r}")
                raise TierflowError(f"--set {key}: {part!r} is not a table; valid keys: {', '.join(valid_keys())}")
            node = child
        node[parts[-1]] = parse_value(raw.strip())
        # A cache's size is one of several keys: an override of one replaces the others from the file.
        if len(parts) == 2 and parts[1] in _CAPACITY_KEYS:
            for other in _CAPACITY_KEYS:
                if other != parts[1] and f"{parts[0]}.{other}" not in given:
                    node.pop(other, None)
    return merged


def scenario_names() -> list[str]:
    """The shipped scenarios."""
    return sorted(p.stem for p in scenarios_dir().glob("*.toml"))


def not_a_file(path: Path) -> str:
    """Why ``path``, which is not a regular file, cannot be read as one."""
    if path.is_dir():
        return "is a directory, not a file"
    return "not a regular file" if path.exists() else "no such file"


def resolve_scenario_path(name_or_path: str) -> Path:
    """A shipped scenario's file by name, or a TOML file by path."""
    if not name_or_path.strip():
        raise TierflowError(f"no scenario named; shipped: {', '.join(scenario_names())} (or a .toml path)")
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise TierflowError(f"scenario file {path}: {not_a_file(path)}")
        return path
    shipped = scenarios_dir() / f"{name_or_path}.toml"
    if not shipped.is_file():
        raise TierflowError(f"unknown scenario {name_or_path!r}; shipped: {', '.join(scenario_names())} (or a .toml path)")
    return shipped


def load_table(name_or_path: str) -> dict:
    path = resolve_scenario_path(name_or_path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark (Windows editors) is fine
    except tomllib.TOMLDecodeError as error:
        raise TierflowError(f"scenario file {path}: invalid TOML: {error}") from None
    except UnicodeDecodeError:
        raise TierflowError(f"scenario file {path}: not a text file") from None
    except OSError as error:
        raise TierflowError(f"scenario file {path}: cannot be read: {error.strerror or error}") from None


def load_scenario_table(name_or_path: str) -> dict:
    """A scenario file's table, with a relative ``workload.trace`` found next to the file, else in the shipped
    trace data folder (:func:`tierflow.resources.traces_dir`; it holds no trace files today), else left as
    written: relative to the working directory."""
    path = resolve_scenario_path(name_or_path)
    table = load_table(name_or_path)
    trace = table.get("workload", {}).get("trace") if isinstance(table.get("workload"), Mapping) else None
    if isinstance(trace, str) and trace and not Path(trace).is_absolute():
        for base in (path.parent, traces_dir()):
            if (base / trace).is_file():
                table["workload"]["trace"] = str(base / trace)
                break
    return table


def scenario_from_table(table: Mapping[str, Any]) -> Scenario:
    return _build(Scenario, table, "")


def load_scenario(name_or_path: str, overrides: Iterable[str] = ()) -> Scenario:
    """Load a shipped scenario (by name) or a TOML file, apply ``--set`` overrides and validate.

    A relative ``workload.trace`` in the file is found next to the scenario file, else in the shipped
    traces; one given with ``--set`` is relative to the working directory.
    """
    table = apply_overrides(load_scenario_table(name_or_path), overrides)
    table.setdefault("name", Path(name_or_path).stem)
    return scenario_from_table(table)


def scenario_to_table(scenario: Scenario) -> dict:
    """The scenario as a plain nested dict (for results files); unset values are dropped."""

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        return value

    return clean(attrs.asdict(scenario))
