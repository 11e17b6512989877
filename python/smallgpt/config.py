"""Typed training configuration: dataclasses, packaged presets, TOML files and overrides.

A configuration is built in layers, each overriding the previous one:

1. the dataclass defaults below,
2. ``--preset NAME`` (a TOML file in ``smallgpt/presets/``),
3. ``--config FILE.toml``,
4. per-field overrides ``--model.n_layer 4`` / ``--set optim.lr=1e-3`` and the shortcut flags.

TOML files use the same sections as the dataclasses (``[model]``, ``[data]``, ``[optim]``) plus
top-level keys for :class:`TrainConfig` fields. Unknown keys raise :class:`ConfigError`
listing the valid ones.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "ConfigError",
    "ModelSection",
    "DataSection",
    "OptimSection",
    "TrainConfig",
    "PRESET_DIR",
    "list_presets",
    "load_preset",
    "load_toml",
    "apply_overrides",
    "merge_dict",
    "config_to_dict",
    "config_from_dict",
    "validate",
]

PRESET_DIR = Path(__file__).resolve().parent / "presets"


class ConfigError(ValueError):
    """A configuration key or value is invalid."""


@dataclass
class ModelSection:
    """Model shape; mirrors :class:`smallgpt.model.GPTConfig`.

    ``vocab_size = 0`` takes the vocabulary size from the data folder's ``meta.json``
    (rounded up to a multiple of ``vocab_multiple`` for faster matmuls).
    """

    vocab_size: int = 0
    vocab_multiple: int = 64
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True
    activation: str = "gelu_tanh"
    tie_embeddings: bool = True
    position: str = "learned"
    rope_theta: float = 10000.0


@dataclass
class DataSection:
    """Where batches come from.

    ``path = ""`` means the bundled Tiny Shakespeare, tokenized on first use into
    ``cache_dir`` (default ``~/.cache/smallgpt``). ``batch_size`` is per device and per
    micro-step; tokens per optimizer step = ``batch_size * block_size * grad_accum *
    world_size``. ``quickstart_vocab`` is the BPE vocabulary trained for the bundled text.
    Evaluations read the first ``eval_tokens`` tokens of the validation split (0: all of it);
    the final evaluation reads the whole split when ``final_eval_full`` is true.
    """

    path: str = ""
    cache_dir: str = ""
    quickstart_vocab: int = 512
    batch_size: int = 32
    sampling: str = "random"
    eval_tokens: int = 0
    final_eval_full: bool = True
    eval_batch_size: int = 0


@dataclass
class OptimSection:
    """AdamW, warmup + cosine schedule, clipping and accumulation.

    The LR warms up linearly over ``warmup_steps`` and then follows a cosine from ``lr`` to
    ``min_lr``. Progress along the cosine is ``step / decay_steps`` (``decay_steps = 0``:
    ``max_steps``); when ``max_time`` is set, progress is the larger of that and the fraction
    of the training time used, so a time-limited run always finishes its decay.
    """

    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    decay_steps: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1


@dataclass
class TrainConfig:
    """Everything a training run needs; serialised into every checkpoint."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    out: str = "out/run"
    max_steps: int = 5000
    max_time: float = 0.0
    eval_interval: int = 250
    log_interval: int = 10
    save_interval: int = 1000
    keep_last: int = 2
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    grad_checkpointing: bool = False
    threads: int = 0  # CPU intra-op threads; 0 = auto (idle cores, see train.auto_threads)
    seed: int = 1337
    tensorboard: bool = False
    progress: bool = True
    plot: bool = True


_SECTIONS = {"model": ModelSection, "data": DataSection, "optim": OptimSection}


def _field_types(cls: type) -> Dict[str, Any]:
    return get_type_hints(cls)


def valid_keys() -> List[str]:
    """All dotted keys accepted in TOML files and overrides."""
    keys: List[str] = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in _SECTIONS:
            keys.extend(f"{f.name}.{g.name}" for g in dataclasses.fields(_SECTIONS[f.name]))
        else:
            keys.append(f.name)
    return keys


def _unknown(key: str) -> ConfigError:
    return ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert ``value`` (from TOML or a command-line string) to the field's type."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = math.nan
                if f.is_integer():
                    return int(f)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value  # pragma: no cover


def set_key(cfg: TrainConfig, key: str, value: Any) -> None:
    """Set dotted ``key`` (e.g. ``"model.n_layer"``) on ``cfg``, converting ``value``."""
    parts = key.split(".")
    if len(parts) == 1 and parts[0] in _SECTIONS:
        raise ConfigError(f"{key!r} is a section; set one of its keys, e.g. {key}.<name>")
    if len(parts) == 2 and parts[0] in _SECTIONS:
        section = getattr(cfg, parts[0])
        types = _field_types(type(section))
        if parts[1] not in types:
            raise _unknown(key)
        setattr(section, parts[1], _coerce(key, value, types[parts[1]]))
        return
    if len(parts) == 1:
        types = _field_types(TrainConfig)
        if key not in types or key in _SECTIONS:
            raise _unknown(key)
        setattr(cfg, key, _coerce(key, value, types[key]))
        return
    raise _unknown(key)


def merge_dict(cfg: TrainConfig, data: Mapping[str, Any], source: str = "config") -> TrainConfig:
    """Apply a nested mapping (as read from TOML) onto ``cfg`` in place and return it."""
    for k, v in data.items():
        if k in _SECTIONS:
            if not isinstance(v, Mapping):
                raise ConfigError(f"{source}: [{k}] must be a table")
            for k2, v2 in v.items():
                try:
                    set_key(cfg, f"{k}.{k2}", v2)
                except ConfigError as e:
                    raise ConfigError(f"{source}: {e}") from None
        else:
            if isinstance(v, Mapping):
                raise _unknown(k)
            try:
                set_key(cfg, k, v)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
    return cfg


def load_toml(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a TOML file; raise :class:`ConfigError` if missing or malformed."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from None


def list_presets() -> List[str]:
    """Names of the packaged presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_preset(name: str) -> Dict[str, Any]:
    """Return the TOML mapping of a packaged preset."""
    path = PRESET_DIR / f"{name}.toml"
    if not path.exists():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    return load_toml(path)


def apply_overrides(cfg: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """Apply ``{"model.n_layer": "4", ...}`` overrides in place and return ``cfg``."""
    for k, v in overrides.items():
        set_key(cfg, k, v)
    return cfg


def config_to_dict(cfg: TrainConfig) -> Dict[str, Any]:
    """Plain nested dict (JSON/TOML friendly) of a config."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Inverse of :func:`config_to_dict` (unknown keys raise :class:`ConfigError`)."""
    return merge_dict(TrainConfig(), data, source="checkpoint config")


def validate(cfg: TrainConfig) -> None:
    """Check value ranges; raise :class:`ConfigError` with the first problem found."""
    m, d, o = cfg.model, cfg.data, cfg.optim
    checks = [
        (m.n_layer >= 1, "model.n_layer must be >= 1"),
        (m.n_head >= 1, "model.n_head must be >= 1"),
        (m.n_embd >= 1, "model.n_embd must be >= 1"),
        (m.block_size >= 1, "model.block_size must be >= 1"),
        (m.vocab_size >= 0, "model.vocab_size must be >= 0 (0 = from the data)"),
        (m.vocab_multiple >= 1, "model.vocab_multiple must be >= 1"),
        (0.0 <= m.dropout < 1.0, "model.dropout must be in [0, 1)"),
        (m.activation in ("relu", "gelu", "gelu_tanh"),
         f"model.activation must be relu, gelu or gelu_tanh, got {m.activation!r}"),
        (m.position in ("learned", "rope"),
         f"model.position must be learned or rope, got {m.position!r}"),
        (d.batch_size >= 1, "data.batch_size must be >= 1"),
        (d.eval_batch_size >= 0, "data.eval_batch_size must be >= 0"),
        (d.eval_tokens >= 0, "data.eval_tokens must be >= 0"),
        (d.sampling in ("random", "sequential"),
         f"data.sampling must be random or sequential, got {d.sampling!r}"),
        (d.quickstart_vocab >= 256 + 1, "data.quickstart_vocab must be >= 257"),
        (o.lr > 0 and math.isfinite(o.lr), f"optim.lr must be positive, got {o.lr}"),
        (0 <= o.min_lr <= o.lr, f"optim.min_lr must be in [0, lr], got {o.min_lr}"),
        (o.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
        (o.decay_steps >= 0, "optim.decay_steps must be >= 0"),
        (o.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1/beta2 must be in [0, 1)"),
        (o.eps > 0, "optim.eps must be positive"),
        (o.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables clipping)"),
        (o.grad_accum >= 1, "optim.grad_accum must be >= 1"),
        (cfg.max_steps >= 0, "max_steps must be >= 0"),
        (cfg.max_time >= 0, "max_time must be >= 0 (0 = no limit)"),
        (cfg.eval_interval >= 0, "eval_interval must be >= 0"),
        (cfg.log_interval >= 1, "log_interval must be >= 1"),
        (cfg.save_interval >= 0, "save_interval must be >= 0"),
        (cfg.keep_last >= 0, "keep_last must be >= 0"),
        (cfg.dtype in ("auto", "float32", "bfloat16", "float16"),
         f"dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}"),
        (cfg.threads >= 0, "threads must be >= 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    if m.n_embd % m.n_head != 0:
        raise ConfigError(
            f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})"
        )
    if m.position == "rope" and (m.n_embd // m.n_head) % 2 != 0:
        raise ConfigError("rope needs an even head size (n_embd / n_head)")
    if cfg.max_steps == 0 and cfg.max_time == 0:
        raise ConfigError("set max_steps or max_time (both are 0)")


def build_config(
    preset: Optional[str] = None,
    config_file: Optional[str] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    base: Optional[TrainConfig] = None,
) -> TrainConfig:
    """Layer defaults (or ``base``), preset, TOML file and overrides into one config."""
    cfg = base if base is not None else TrainConfig()
    if preset:
        merge_dict(cfg, load_preset(preset), source=f"preset {preset}")
    if config_file:
        merge_dict(cfg, load_toml(config_file), source=str(config_file))
    if overrides:
        apply_overrides(cfg, overrides)
    return cfg
