"""The checkpoint format and the run folder: the one place that writes and reads them.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python values, so it
loads with ``torch.load(weights_only=True)``; smallgpt never loads a file any other way (a
pickle can run code, and checkpoints are often downloaded). Its keys::

    format, version       "smallgpt-checkpoint", 2
    model_config          GPTConfig fields (dict)
    model                 the model's state dict (full, unsharded, on the CPU)
    tokenizer             the tokenizer's JSON text, or None
    train_config          the TrainConfig (dict), or None
    step                  optimizer steps taken
    trainer               the Trainer's state: optimizer, scaler, data cursor, RNG of every
                          rank, clock, threads, best validation loss (see Trainer.state_dict)
    metrics               figures of the last evaluation (val_loss, val_bpb, ...)

A run folder (``smallgpt-train --out``) holds ``ckpt_latest.pt``, the last ``keep_last``
numbered ``ckpt_NNNNNNN.pt``, ``ckpt_best.pt``, ``tokenizer.json``, ``config.json``,
``metrics.jsonl`` and ``loss_curve.png``. :class:`RunFolder` knows those names.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

import torch

from smallgpt._io import (
    atomic_write,
    atomic_write_text,
    remove_stale_temporaries,
    temporary_path,
    write_error,
)
from smallgpt.model import GPT, GPTConfig, check_weight_shapes

if TYPE_CHECKING:
    from smallgpt.tokenizer import Tokenizer

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "LoadedModel",
    "RunFolder",
    "RunInUseError",
    "load_model",
    "is_huggingface_folder",
    "nonfinite_tensors",
]

FORMAT = "smallgpt-checkpoint"
VERSION = 2
PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(ValueError):
    """A file or folder is not a usable checkpoint (the message names it and says why)."""


class RunInUseError(CheckpointError):
    """Another process is training in the run folder (the message names its PID)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass
class Checkpoint:
    """A model, how it was made, and (for training checkpoints) how to continue.

    ``model_config`` and ``model`` are all that sampling, evaluation and export need;
    ``trainer`` is the opaque state of :meth:`smallgpt.train.Trainer.state_dict`.
    """

    model_config: GPTConfig
    model: Dict[str, torch.Tensor]
    tokenizer: Optional[str] = None
    train_config: Optional[Dict[str, Any]] = None
    step: int = 0
    trainer: Dict[str, Any] = field(default_factory=dict)
    metrics: Dict[str, Any] = field(default_factory=dict)
    version: int = VERSION

    def to_dict(self) -> Dict[str, Any]:
        """The plain dict that is saved (loadable with ``weights_only=True``)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "model_config": self.model_config.to_dict(),
            "model": self.model,
            "tokenizer": self.tokenizer,
            "train_config": self.train_config,
            "step": self.step,
            "trainer": self.trainer,
            "metrics": self.metrics,
        }

    def save(self, path: PathLike) -> Path:
        """Write atomically: a temporary file in the same folder, then a rename.

        Raises:
            WriteError: the file could not be written (a full disk says "no space left on
                device"); an existing file at ``path`` is left as it was.
        """
        obj = self.to_dict()
        return atomic_write(path, lambda f: torch.save(obj, f))

    @classmethod
    def load(cls, path: PathLike, map_location: Any = "cpu") -> Checkpoint:
        """Read a checkpoint with ``weights_only=True``.

        Raises:
            CheckpointError: missing, unreadable, truncated or foreign files, files that need
                pickled code to load (refused, never run), and malformed contents.
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path} is not a PyTorch checkpoint (not a zip archive: "
                                  "empty, truncated or another kind of file)")
        try:
            obj = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
                raise CheckpointError(
                    f"{path} holds pickled Python objects beyond tensors and plain values; "
                    "smallgpt loads checkpoints with weights_only=True only and refuses it"
                ) from None
            raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(e)}") from None
        except (RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError,
                IndexError, KeyError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(e)}") from None
        return cls.from_dict(obj, source=str(path))

    @classmethod
    def from_dict(cls, obj: Any, source: str = "checkpoint") -> Checkpoint:
        """Validate a loaded dict (format versions 1 and 2) and wrap it."""
        if not isinstance(obj, dict) or "model" not in obj or "model_config" not in obj:
            raise CheckpointError(f"{source} is not a smallgpt checkpoint (no model/model_config)")
        version = obj.get("version", 1)
        if obj.get("format", FORMAT) != FORMAT or version not in (1, 2):
            raise CheckpointError(f"{source}: unknown format {obj.get('format')!r} version "
                                  f"{version!r} (this smallgpt reads {FORMAT} 1 and 2)")
        if not isinstance(obj["model"], dict) or not all(
            isinstance(v, torch.Tensor) for v in obj["model"].values()
        ):
            raise CheckpointError(f"{source}: 'model' is not a state dict of tensors")
        try:
            config = GPTConfig.from_dict(dict(obj["model_config"]))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: bad model_config: {_first_line(e)}") from None
        tok = obj.get("tokenizer")
        if tok is not None and not isinstance(tok, str):
            raise CheckpointError(f"{source}: 'tokenizer' is not a JSON string")
        metrics = obj.get("metrics") if version >= 2 else {
            k: obj[k] for k in ("val_loss", "val_bpb") if obj.get(k) is not None
        }
        return cls(
            model_config=config,
            model=_strip_wrapper_prefixes(obj["model"]),
            tokenizer=tok,
            train_config=obj.get("train_config"),
            step=int(obj.get("step", 0)),
            trainer=obj.get("trainer") or {} if version >= 2 else {},
            metrics=dict(metrics or {}),
            version=version,
        )

    def build_model(self, source: str = "checkpoint") -> GPT:
        """A :class:`GPT` with this checkpoint's weights, in eval mode, on the CPU.

        Raises:
            CheckpointError: the weights do not match the config (checked on their shapes
                before the model is built, so a config declaring a huge model over small
                weights allocates nothing), or some are NaN/infinite (a diverged run).
        """
        self.validate_weights(source)
        model = GPT(self.model_config)
        try:
            model.load_state_dict(self.model, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{source}: weights do not match the model config: "
                                  f"{_first_line(e)}") from None
        model.eval()
        return model

    def validate_weights(self, source: str = "checkpoint") -> None:
        """Check, without building the model, that the weights fit ``model_config`` (shapes)
        and are finite.

        Raises:
            CheckpointError: naming ``source`` and the first offending tensor.
        """
        try:
            check_weight_shapes(self.model_config,
                                {k: tuple(v.shape) for k, v in self.model.items()}, source)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        bad = nonfinite_tensors(self.model)
        if bad:
            raise CheckpointError(f"{source}: weights are not finite ({bad[0]}"
                                  f"{' and more' if len(bad) > 1 else ''}): the run diverged "
                                  "before this checkpoint; use an earlier one")

    def build_tokenizer(self, source: str = "checkpoint") -> Optional[Tokenizer]:
        """The tokenizer saved in the checkpoint, or None."""
        if not self.tokenizer:
            return None
        from smallgpt.tokenizer import Tokenizer

        try:
            return Tokenizer.from_json_str(self.tokenizer, source=f"{source}[tokenizer]")
        except ValueError as e:
            raise CheckpointError(f"{source}: bad tokenizer: {_first_line(e)}") from None


def nonfinite_tensors(state: Dict[str, torch.Tensor]) -> List[str]:
    """Names of the floating-point tensors in ``state`` that hold NaN or infinity."""
    return [k for k, v in state.items()
            if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _strip_wrapper_prefixes(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # torch.compile and DDP wrap the module; their prefixes are not part of the model.
    out = {}
    for key, value in state.items():
        for prefix in ("_orig_mod.", "module."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


# ---------------------------------------------------------------- the run folder

_NUMBERED = re.compile(r"^ckpt_(\d+)\.pt$")


class RunFolder:
    """The files of one training run and the rules for (re)using the folder."""

    LATEST = "ckpt_latest.pt"
    BEST = "ckpt_best.pt"

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self.latest = self.path / self.LATEST
        self.best = self.path / self.BEST
        self.config_json = self.path / "config.json"
        self.metrics = self.path / "metrics.jsonl"
        self.tokenizer = self.path / "tokenizer.json"
        self.plot = self.path / "loss_curve.png"
        self._lock_fd: Optional[int] = None

    def numbered(self) -> List[Tuple[int, Path]]:
        """``(step, path)`` of the numbered checkpoints, oldest first."""
        if not self.path.is_dir():
            return []
        found = []
        for p in self.path.iterdir():
            m = _NUMBERED.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def run_files(self) -> List[Path]:
        """The files a previous run left here (checkpoints, metrics, config, plot)."""
        names = [self.latest, self.best, self.config_json, self.metrics, self.plot]
        return [p for p in names if p.exists()] + [p for _, p in self.numbered()]

    def check_new_run(self, overwrite: bool) -> List[Path]:
        """Refuse a folder that cannot take a fresh run, changing nothing; returns the files
        of the previous run that :meth:`prepare_new_run` would delete.

        Raises:
            CheckpointError: the folder holds a run and ``overwrite`` is false; the path is a
                file.
        """
        if self.path.exists() and not self.path.is_dir():
            raise CheckpointError(f"--out {self.path} is a file, not a folder")
        old = self.run_files()
        if old and not overwrite:
            raise CheckpointError(
                f"{self.path} already holds a run ({', '.join(p.name for p in old[:3])}"
                f"{', ...' if len(old) > 3 else ''}); continue it with --resume, replace it with "
                "--overwrite, or choose another --out"
            )
        return old

    def prepare_new_run(self, overwrite: bool) -> None:
        """Make the folder ready for a fresh run; refuse to reuse one that holds another run.

        Takes the folder's lock (:meth:`lock`) before anything in it changes.

        Raises:
            CheckpointError: the folder holds a run and ``overwrite`` is false; the path is a
                file; the folder cannot be created or written.
            RunInUseError: another process trains in the folder.
        """
        self.check_new_run(overwrite)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".smallgpt-write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise CheckpointError(f"cannot write to --out {self.path}: "
                                  f"{e.strerror or _first_line(e)}") from None
        self.lock()
        old = self.check_new_run(overwrite)  # again: the folder may have changed meanwhile
        remove_stale_temporaries(self.path)
        for p in old:
            p.unlink(missing_ok=True)
        if old:
            shutil.rmtree(self.path / "tensorboard", ignore_errors=True)

    LOCK = ".smallgpt-train.lock"

    def lock(self) -> None:
        """Hold the folder's lock until :meth:`unlock` or the end of this process.

        An OS file lock (``flock``) on ``.smallgpt-train.lock``, which also records the
        holder's PID: the kernel releases it when the process ends, however it ends, so a
        killed run never leaves a stale lock. Taking it again in the same process is a no-op.
        Where the file system cannot lock (some network file systems), runs go unlocked.

        Raises:
            RunInUseError: another process holds it (the message names its PID).
        """
        if self._lock_fd is not None:
            return
        try:
            import fcntl
        except ImportError:  # Windows: no flock
            return
        path = self.path / self.LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RunInUseError(
                f"{self.path} is in use: another smallgpt-train (PID {holder}) is training in "
                "it; wait for it to finish or stop it, or choose another --out") from None
        except OSError:
            os.close(fd)
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release :meth:`lock` (the file stays: removing it could race with a new holder)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def tidy_for_resume(self, step: int) -> None:
        """Undo what a killed process left after its last checkpoint at ``step``: its
        temporary files, and the ``metrics.jsonl`` records of the steps after ``step`` (they
        will be logged again) or cut off mid-line. The metrics file is rewritten atomically."""
        remove_stale_temporaries(self.path)
        if not self.metrics.is_file():
            return
        kept, dropped = [], 0
        for line in self.metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
                ok = isinstance(rec, dict) and int(rec.get("step", 0)) <= step
            except (json.JSONDecodeError, TypeError, ValueError):
                ok = False
            if ok:
                kept.append(line + "\n")
            else:
                dropped += 1
        if dropped:
            atomic_write_text(self.metrics, "".join(kept))

    def load_latest(self) -> Checkpoint:
        """The checkpoint ``--resume`` continues from."""
        if not self.latest.exists():
            raise CheckpointError(f"--resume: no checkpoint {self.latest}")
        return Checkpoint.load(self.latest)

    def save(self, ckpt: Checkpoint, keep_last: int) -> None:
        """Write ``ckpt_latest.pt`` (and a numbered copy, keeping the last ``keep_last``)."""
        if keep_last <= 0:
            ckpt.save(self.latest)
            return
        numbered = self.path / f"ckpt_{ckpt.step:07d}.pt"
        ckpt.save(numbered)
        _atomic_link(numbered, self.latest)
        for _, old in self.numbered()[:-keep_last]:
            old.unlink(missing_ok=True)

    def save_best(self, ckpt: Checkpoint) -> None:
        """Write ``ckpt_best.pt``."""
        ckpt.save(self.best)

    def write_text(self, path: Path, text: str) -> None:
        """Atomic text write of one of the run's files."""
        atomic_write_text(path, text)

    def checkpoint_for_use(self) -> Path:
        """The checkpoint to sample, evaluate or export: best, else latest, else the newest
        numbered one."""
        for p in (self.best, self.latest):
            if p.is_file():
                return p
        numbered = self.numbered()
        if numbered:
            return numbered[-1][1]
        raise CheckpointError(
            f"no checkpoint in {self.path} (expected ckpt_best.pt / ckpt_latest.pt, or a "
            "Hugging Face GPT-2 folder with config.json and model.safetensors)"
        )


def _atomic_link(src: Path, dst: Path) -> None:
    """Make ``dst`` a copy of ``src`` atomically (a hard link where the file system allows)."""
    tmp = temporary_path(dst)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        try:
            shutil.copyfile(src, tmp)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise write_error(dst, e, dst.parent) from None
    os.replace(tmp, dst)


# ---------------------------------------------------------------- models from anywhere


def is_huggingface_folder(path: PathLike) -> bool:
    """A folder with ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and (
        (p / "model.safetensors").is_file() or (p / "pytorch_model.bin").is_file()
    )


@dataclass
class LoadedModel:
    """What :func:`load_model` found: the model, its tokenizer and where they came from."""

    model: GPT
    tokenizer: Optional[Tokenizer]
    source: Path
    checkpoint: Optional[Checkpoint] = None

    @property
    def kind(self) -> str:
        """``"huggingface"`` or ``"smallgpt"``."""
        return "smallgpt" if self.checkpoint is not None else "huggingface"


def load_model(path: PathLike, gpt2_vocab: Optional[PathLike] = None) -> LoadedModel:
    """Load a model and its tokenizer from a run folder, a checkpoint file or a HF GPT-2 folder.

    Run folders give ``ckpt_best.pt`` (else ``ckpt_latest.pt``). A Hugging Face folder's
    tokenizer comes from ``gpt2_vocab`` (``encoder.json`` + ``vocab.bpe``) or from the folder
    itself (``encoder.json`` + ``vocab.bpe``, ``vocab.json`` + ``merges.txt`` as transformers
    saves GPT-2's tokenizer, or ``tokenizer.json``); without one the tokenizer is None. The
    model is in eval mode on the CPU.

    Raises:
        CheckpointError: anything that is not a loadable model, with a one-line reason.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if is_huggingface_folder(p):
        try:
            model = GPT.from_huggingface(p)
        except (ValueError, OSError, RuntimeError, KeyError, TypeError, AttributeError,
                pickle.UnpicklingError) as e:
            raise CheckpointError(f"{p}: cannot load the Hugging Face model: {_first_line(e)}") \
                from None
        tok = _huggingface_tokenizer(p, gpt2_vocab)
        _check_vocab(tok, model.config.vocab_size, p)
        return LoadedModel(model, tok, p)
    file = RunFolder(p).checkpoint_for_use() if p.is_dir() else p
    ckpt = Checkpoint.load(file)
    model = ckpt.build_model(str(file))
    tok = ckpt.build_tokenizer(str(file))
    if tok is None and (file.parent / "tokenizer.json").is_file():
        tok = _load_tokenizer_file(file.parent / "tokenizer.json")
    _check_vocab(tok, model.config.vocab_size, file)
    return LoadedModel(model, tok, file, ckpt)


def _check_vocab(tok: Optional[Tokenizer], model_vocab: int, where: Path) -> None:
    if tok is not None and tok.vocab_size > model_vocab:
        raise CheckpointError(f"{where}: the tokenizer has {tok.vocab_size} tokens but the model "
                              f"only {model_vocab}")


def _load_tokenizer_file(path: Path) -> Tokenizer:
    from smallgpt.tokenizer import Tokenizer

    try:
        head = path.read_text(encoding="utf-8")
        if '"smallgpt-tokenizer"' in head:
            return Tokenizer.load(path)
        return Tokenizer.from_huggingface(path)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read the tokenizer: {_first_line(e)}") from None


def _huggingface_tokenizer(folder: Path, gpt2_vocab: Optional[PathLike]) -> Optional[Tokenizer]:
    from smallgpt.tokenizer import Tokenizer

    d = Path(gpt2_vocab) if gpt2_vocab is not None else folder
    for enc, bpe in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
        if (d / enc).is_file() and (d / bpe).is_file():
            try:
                return Tokenizer.from_gpt2(d / enc, d / bpe)
            except (ValueError, OSError) as e:
                raise CheckpointError(f"{d}: cannot read GPT-2's vocabulary: {_first_line(e)}") \
                    from None
    if (d / "tokenizer.json").is_file():
        return _load_tokenizer_file(d / "tokenizer.json")
    if gpt2_vocab is not None:
        raise CheckpointError(f"{d} has no encoder.json + vocab.bpe (or vocab.json + merges.txt)")
    return None


def describe(ckpt: Checkpoint) -> str:
    """One line about a checkpoint (for logs)."""
    c = ckpt.model_config
    return (f"step {ckpt.step}, {c.n_layer} layers x {c.n_embd}, vocab {c.vocab_size}"
            + (f", val_loss {ckpt.metrics['val_loss']:.4f}" if "val_loss" in ckpt.metrics
               else ""))


def write_json(path: Path, obj: Any) -> None:
    """Atomic, indented JSON (config.json and friends)."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")

