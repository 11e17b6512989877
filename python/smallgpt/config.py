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

from smallgpt.model import GPTConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "ConfigError",
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
    "default_out",
    "build_config",
]

PRESET_DIR = Path(__file__).resolve().parent / "presets"
#: ``TrainConfig.head_dtype`` values.
HEAD_DTYPES = ("same", "auto", "float32", "bfloat16")
#: ``OptimSection.schedule`` values: the decay shapes of :mod:`smallgpt.train.schedule`.
SCHEDULES = ("cosine", "wsd")
BY_TIME = "by_time"


class ConfigError(ValueError):
    """A configuration key or value is invalid."""


def _default_model() -> GPTConfig:
    # GPTConfig's own defaults (GPT-2 small's shape), except that the vocabulary comes from the
    # data folder unless set.
    return GPTConfig(vocab_size=0)


@dataclass
class DataSection:
    """Where batches come from, and how many per optimizer step (the ``[data]`` section).

    Attributes:
        path: Shard folder (``smallgpt-tokenize``'s output, or llm.c's ``*.bin`` shards).
            ``""`` means the bundled Tiny Shakespeare, tokenized on first use into
            ``cache_dir``.
        cache_dir: Where the bundled Tiny Shakespeare's shards are cached (``""``:
            ``$SMALLGPT_CACHE``, else ``~/.cache/smallgpt``).
        quickstart_vocab: Vocabulary size of the BPE trained on Tiny Shakespeare when
            ``path = ""`` (at least 257).
        batch_size: The **global** batch: sequences per optimizer step, over all processes
            and micro-steps (tokens per step = ``batch_size * seq_len``, whatever the number
            of GPUs).
        micro_batch_size: Sequences one process runs through one forward/backward pass (0:
            ``batch_size / processes``, no accumulation). Accumulation is
            ``batch_size / (micro_batch_size * processes)`` and must divide evenly.
        seq_len: Length of the training and evaluation windows (0: ``model.block_size``;
            shorter windows train a long-context model, e.g. a pretrained GPT-2, on less
            memory).
        vocab_multiple: ``model.vocab_size = 0`` takes the vocabulary size from the data
            folder, rounded up to a multiple of this (faster matmuls).
        sampling: ``"random"`` (random windows) or ``"sequential"`` (passes over the data in
            order).
        eval_tokens: Evaluations during the run read the first ``eval_tokens`` tokens of the
            validation split, always the same ones (0: all of it).
        final_eval_full: The final evaluation reads the whole validation split.
        eval_batch_size: Windows per evaluation forward pass (0: ``micro_batch_size``).
    """

    path: str = ""
    cache_dir: str = ""
    quickstart_vocab: int = 512
    batch_size: int = 32
    micro_batch_size: int = 0
    seq_len: int = 0
    vocab_multiple: int = 64
    sampling: str = "random"
    eval_tokens: int = 0
    final_eval_full: bool = True
    eval_batch_size: int = 0


@dataclass
class OptimSection:
    """Optimizer, learning-rate schedule and clipping (the ``[optim]`` section).

    Both optimizers follow one schedule: a linear warmup over ``warmup_steps``, then
    ``schedule`` from ``lr`` to ``min_lr``, every group's rate scaled by the same factor.
    Progress is ``step / decay_steps``; when ``max_time`` is set, it is the larger of that and
    the fraction of the training time used, so a time-limited run always finishes its decay.

    Attributes:
        name: ``"adamw"``: AdamW for every parameter. ``"muon"``: Muon for the 2-D weights
            inside the blocks, AdamW (the settings below) for embeddings, head, norms and
            biases.
        lr: Peak AdamW learning rate.
        embed_lr: AdamW rate of the input embeddings when they are not tied to the head
            (0: ``lr``).
        min_lr: The rate at the end of the decay (at most ``lr``).
        warmup_steps: Steps of linear warmup from 0 to the peak rates.
        decay_steps: The step at which the decay reaches ``min_lr`` (0: ``max_steps``).
        schedule: ``"cosine"``, or ``"wsd"`` (warmup-stable-decay: the peak rate, then a
            linear decay over the last ``decay_fraction`` of the run).
        decay_fraction: The share of the run that ``schedule = "wsd"`` spends decaying.
        weight_decay: AdamW's decoupled weight decay, on matrices only (not on biases and
            norm gains).
        beta1: AdamW's first-moment coefficient.
        beta2: AdamW's second-moment coefficient.
        eps: AdamW's epsilon.
        grad_clip: Clip the global gradient norm to this (0: no clipping).
        muon_lr: Peak Muon learning rate (``name = "muon"``).
        muon_momentum: Muon's momentum.
        muon_weight_decay: Muon's decoupled weight decay.
    """

    name: str = "adamw"
    lr: float = 1e-3
    embed_lr: float = 0.0
    min_lr: float = 1e-4
    warmup_steps: int = 100
    decay_steps: int = 0
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0


@dataclass
class TrainConfig:
    """Everything a training run needs; serialised into every checkpoint (top-level keys).

    Attributes:
        model: The ``[model]`` section: a :class:`smallgpt.model.GPTConfig` itself (its
            fields, defaults and validation), except that ``vocab_size = 0`` takes the
            vocabulary from the data.
        data: The ``[data]`` section: where batches come from, and how many per optimizer
            step.
        optim: The ``[optim]`` section: optimizer, learning-rate schedule and clipping.
        out: Run folder (``""``: named by the command line after the config file, the data
            folder or the preset).
        init_from: Start from a pretrained model (a Hugging Face GPT-2 folder, a run folder
            or a checkpoint file): its weights and shape, a fresh optimizer and schedule.
        max_steps: Stop after this many optimizer steps (0: no step limit).
        max_time: Stop after this many seconds, final evaluation and checkpoint included,
            resumes counted (0: no time limit).
        eval_interval: Evaluate every N steps (0: only at the end).
        log_interval: Write a ``metrics.jsonl`` record every N steps.
        save_interval: Write a checkpoint every N steps (0: only at the end and on Ctrl-C or
            SIGTERM).
        keep_last: Numbered checkpoints ``ckpt_NNNNNNN.pt`` to keep (0: only
            ``ckpt_latest.pt``).
        device: ``"auto"`` (CUDA if available, else the CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:N"``, ``"mps"``.
        dtype: Autocast precision: ``"auto"`` (bf16 on CUDA GPUs with bf16 and on CPUs with
            native bf16, fp16 with a GradScaler on older GPUs, else fp32), ``"float32"``,
            ``"bfloat16"``, ``"float16"``. Master weights are always fp32.
        head_dtype: Precision of the output head and loss in training: ``"same"`` as
            ``dtype``, ``"float32"``, ``"bfloat16"``, or ``"auto"`` (bf16 where the device
            has native bf16 units, else the same as the rest).
        parallel: ``"auto"`` (DDP when torchrun starts several processes), ``"none"``,
            ``"ddp"`` or ``"fsdp"`` (FSDP2).
        compile: Wrap the model in ``torch.compile``.
        grad_checkpointing: Recompute activations in the backward pass (less memory).
        threads: CPU intra-op threads (0: one per core that is idle when the run starts;
            ``--resume`` reuses the count the run started with).
        seed: Random seed (the initial weights; each process's dropout and data draws
            follow from it).
        tensorboard: Also log to ``<out>/tensorboard``.
        wandb: Weights & Biases project to log to (``""``: none).
        trackio: trackio project to log to (``""``: none).
        progress: Show a progress bar (on a terminal) and per-step lines.
        plot: Draw ``loss_curve.png`` at the end (needs matplotlib).
    """

    model: GPTConfig = field(default_factory=_default_model)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    out: str = ""
    init_from: str = ""
    max_steps: int = 5000
    max_time: float = 0.0
    eval_interval: int = 250
    log_interval: int = 10
    save_interval: int = 1000
    keep_last: int = 2
    device: str = "auto"
    dtype: str = "auto"
    head_dtype: str = "same"
    parallel: str = "auto"
    compile: bool = False
    grad_checkpointing: bool = False
    threads: int = 0
    seed: int = 1337
    tensorboard: bool = False
    wandb: str = ""
    trackio: str = ""
    progress: bool = True
    plot: bool = True


# Keys that existed before and moved; a clear hint beats the list of valid keys.
_MOVED = {
    "optim.grad_accum": "optim.grad_accum is gone: set the global batch data.batch_size "
    "(sequences per optimizer step, all processes) and data.micro_batch_size (per process); "
    "accumulation is derived",
    "model.vocab_multiple": "model.vocab_multiple moved to data.vocab_multiple",
}

_SECTIONS = {"model": GPTConfig, "data": DataSection, "optim": OptimSection}


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
    if key in _MOVED:
        return ConfigError(_MOVED[key])
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
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a TOML file (it is not UTF-8 text)") from None
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


def _non_finite(cfg: TrainConfig) -> Optional[str]:
    for section in (None, *_SECTIONS):
        obj = cfg if section is None else getattr(cfg, section)
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                return f"{section + '.' if section else ''}{f.name} must be a finite number"
    return None


def validate(cfg: TrainConfig) -> None:
    """Check value ranges; raise :class:`ConfigError` with the first problem found."""
    bad = _non_finite(cfg)
    if bad:
        raise ConfigError(bad)
    try:
        cfg.model.validate()
    except ValueError as e:
        raise ConfigError(f"model.{e}") from None
    d, o = cfg.data, cfg.optim
    if d.seq_len > cfg.model.block_size and not cfg.init_from:
        raise ConfigError(f"data.seq_len ({d.seq_len}) exceeds model.block_size "
                          f"({cfg.model.block_size})")
    checks = [
        (d.batch_size >= 1, "data.batch_size must be >= 1"),
        (d.micro_batch_size >= 0, "data.micro_batch_size must be >= 0 (0 = no accumulation)"),
        (d.micro_batch_size <= d.batch_size,
         f"data.micro_batch_size ({d.micro_batch_size}) exceeds data.batch_size "
         f"({d.batch_size}), the global batch"),
        (d.vocab_multiple >= 1, "data.vocab_multiple must be >= 1"),
        (d.seq_len >= 0, "data.seq_len must be >= 0 (0 = model.block_size)"),
        (d.eval_batch_size >= 0, "data.eval_batch_size must be >= 0"),
        (d.eval_tokens >= 0, "data.eval_tokens must be >= 0"),
        (d.sampling in ("random", "sequential"),
         f"data.sampling must be random or sequential, got {d.sampling!r}"),
        (d.quickstart_vocab >= 256 + 1, "data.quickstart_vocab must be >= 257"),
        (o.name in ("adamw", "muon"), f"optim.name must be adamw or muon, got {o.name!r}"),
        (o.lr > 0, f"optim.lr must be positive, got {o.lr}"),
        (o.muon_lr > 0, f"optim.muon_lr must be positive, got {o.muon_lr}"),
        (o.embed_lr >= 0, f"optim.embed_lr must be >= 0 (0 = lr), got {o.embed_lr}"),
        (0 <= o.muon_momentum < 1, "optim.muon_momentum must be in [0, 1)"),
        (o.muon_weight_decay >= 0, "optim.muon_weight_decay must be >= 0"),
        (0 <= o.min_lr <= o.lr, f"optim.min_lr must be in [0, lr], got {o.min_lr}"),
        (o.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
        (o.decay_steps >= 0, "optim.decay_steps must be >= 0"),
        (o.schedule in SCHEDULES,
         f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {o.schedule!r}"),
        (0 < o.decay_fraction <= 1,
         f"optim.decay_fraction must be in (0, 1], got {o.decay_fraction}"),
        (o.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1/beta2 must be in [0, 1)"),
        (o.eps > 0, "optim.eps must be positive"),
        (o.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables clipping)"),
        (cfg.max_steps >= 0, "max_steps must be >= 0"),
        (cfg.max_time >= 0, "max_time must be >= 0 (0 = no limit)"),
        (cfg.eval_interval >= 0, "eval_interval must be >= 0"),
        (cfg.log_interval >= 1, "log_interval must be >= 1"),
        (cfg.save_interval >= 0, "save_interval must be >= 0"),
        (cfg.keep_last >= 0, "keep_last must be >= 0"),
        (cfg.dtype in ("auto", "float32", "bfloat16", "float16"),
         f"dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}"),
        (cfg.head_dtype in HEAD_DTYPES,
         f"head_dtype must be one of {', '.join(HEAD_DTYPES)}, got {cfg.head_dtype!r}"),
        (cfg.parallel in ("auto", "none", "ddp", "fsdp"),
         f"parallel must be auto, none, ddp or fsdp, got {cfg.parallel!r}"),
        (cfg.threads >= 0, "threads must be >= 0"),
        (0 <= cfg.seed <= _MAX_SEED, f"seed must be in [0, 2**62], got {cfg.seed}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    if cfg.max_steps == 0 and cfg.max_time == 0:
        raise ConfigError("set max_steps or max_time (both are 0)")


_MAX_SEED = 2**62  # torch seeds are 64-bit; ranks add their index


def default_out(cfg: TrainConfig, preset: Optional[str] = None,
                config_file: Optional[str] = None) -> str:
    """The run folder when none is named: ``out/<config file stem>``, else
    ``out/<data folder name>``, else ``out/<preset>``, else ``out/run``."""
    if cfg.out:
        return cfg.out
    if config_file:
        return f"out/{Path(config_file).stem}"
    if cfg.data.path:
        name = Path(cfg.data.path).resolve().name
        return f"out/{name or 'run'}"
    return f"out/{preset or 'run'}"


def _flat_keys(data: Mapping[str, Any]) -> List[str]:
    keys = []
    for k, v in data.items():
        if isinstance(v, Mapping):
            keys.extend(f"{k}.{k2}" for k2 in v)
        elif k != BY_TIME:
            keys.append(k)
    return keys


def _by_time_rows(data: Mapping[str, Any], source: str) -> List[Dict[str, Any]]:
    rows = data.get(BY_TIME, [])
    if not isinstance(rows, list) or not all(
        isinstance(r, Mapping) and isinstance(r.get("min_time"), (int, float)) for r in rows
    ):
        raise ConfigError(f"{source}: [[{BY_TIME}]] must be tables with a min_time number")
    return [dict(r) for r in rows]


def apply_by_time(cfg: TrainConfig, rows: List[Dict[str, Any]], keep: set,
                  source: str = "config") -> Optional[float]:
    """Apply the ``[[by_time]]`` row for ``cfg.max_time``: the one with the largest
    ``min_time`` at most ``max_time`` (none without a time limit). Keys in ``keep`` (set by
    the user) are left alone. Returns the row's ``min_time``, or None."""
    if cfg.max_time <= 0:
        return None
    fitting = [r for r in rows if r["min_time"] <= cfg.max_time]
    if not fitting:
        return None
    row = max(fitting, key=lambda r: r["min_time"])
    values = {k: v for k, v in row.items() if k != "min_time"}
    for key in _flat_keys(values):
        if key in keep:
            continue
        section, _, name = key.partition(".")
        merge_dict(cfg, {section: {name: values[section][name]}} if name else {key: values[key]},
                   source=f"{source} [[{BY_TIME}]] min_time={row['min_time']:g}")
    return float(row["min_time"])


def build_config(
    preset: Optional[str] = None,
    config_file: Optional[str] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    base: Optional[TrainConfig] = None,
) -> TrainConfig:
    """Layer defaults (or ``base``), preset, TOML file and overrides into one config.

    A preset or file may end with ``[[by_time]]`` rows (``min_time = 120`` plus keys such as
    ``model = { n_layer = 2 }``): the model's shape can then follow the time budget, the single
    dial of a time-bounded run. The row for the final ``max_time`` applies last, except to keys
    set by a later layer (the config file, for a preset's rows; the overrides always).
    """
    cfg = base if base is not None else TrainConfig()
    rows: List[Dict[str, Any]] = []
    keep: set = set(overrides or {})
    if preset:
        data = load_preset(preset)
        rows = _by_time_rows(data, f"preset {preset}")
        merge_dict(cfg, {k: v for k, v in data.items() if k != BY_TIME}, source=f"preset {preset}")
    if config_file:
        data = load_toml(config_file)
        own_rows = _by_time_rows(data, str(config_file))
        if own_rows:  # the file's own rows refine its own values
            rows = own_rows
        else:  # the preset's rows must not undo what the file sets
            keep |= set(_flat_keys(data))
        merge_dict(cfg, {k: v for k, v in data.items() if k != BY_TIME}, source=str(config_file))
    if overrides:
        apply_overrides(cfg, overrides)
    apply_by_time(cfg, rows, keep, source=preset or str(config_file))
    return cfg
