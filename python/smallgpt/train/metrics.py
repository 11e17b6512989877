"""Where a run's figures go: the console, ``metrics.jsonl``, TensorBoard, W&B, trackio, a plot.

Only rank 0 logs. Every sink receives the same flat records (``step``, ``loss``, ``lr``,
``val_loss``, ...). Optional sinks whose package is missing are skipped with a one-line
warning: a run is never lost to a logging extra.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from smallgpt._io import write_error

__all__ = ["MetricsLogger", "plot_metrics", "warn"]

Record = Dict[str, Any]


def warn(message: str) -> None:
    """One line on stderr, prefixed like every smallgpt-train message."""
    print(f"smallgpt-train: warning: {message}", file=sys.stderr, flush=True)


def _json_safe(rec: Record) -> Record:
    """NaN and infinity are not JSON: they are written as null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in rec.items()}


def _scalars(rec: Record) -> Dict[str, float]:
    return {k: float(v) for k, v in rec.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class _TensorBoard:
    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(folder))

    def write(self, rec: Record) -> None:
        for k, v in _scalars(rec).items():
            self.w.add_scalar(k, v, rec["step"])

    def close(self) -> None:
        self.w.close()


class _Wandb:
    def __init__(self, project: str, name: str, config: Dict[str, Any], folder: Path) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, name=name, config=config, dir=str(folder))

    def write(self, rec: Record) -> None:
        self.run.log(_scalars(rec), step=int(rec["step"]))

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    def __init__(self, project: str, name: str, config: Dict[str, Any]) -> None:
        import trackio

        self.trackio = trackio
        trackio.init(project=project, name=name, config=config)

    def write(self, rec: Record) -> None:
        self.trackio.log(_scalars(rec), step=int(rec["step"]))

    def close(self) -> None:
        self.trackio.finish()


class MetricsLogger:
    """Fans records out to the run's sinks (rank 0 only; other ranks get a silent logger).

    Args:
        folder: the run folder (``metrics.jsonl``, ``tensorboard/``, ``loss_curve.png``).
        enabled: false on ranks other than 0.
        append: continue ``metrics.jsonl`` (a resumed run) instead of starting it.
        tensorboard / wandb / trackio: which optional sinks to open (project names for the
            last two; "" = off).
        run_name / config: passed to W&B and trackio.
        on_log: called with every record (used by tests and notebooks).
    """

    def __init__(self, folder: Path, *, enabled: bool = True, append: bool = False,
                 tensorboard: bool = False, wandb: str = "", trackio: str = "",
                 run_name: str = "", config: Optional[Dict[str, Any]] = None,
                 on_log: Optional[Callable[[Record], None]] = None) -> None:
        self.folder = folder
        self.enabled = enabled
        self.on_log = on_log
        self.sinks: List[Any] = []
        self._file = None
        if not enabled:
            return
        self._file = open(folder / "metrics.jsonl", "a" if append else "w", encoding="utf-8")
        opened: List[Tuple[str, Callable[[], Any]]] = []
        if tensorboard:
            opened.append(("tensorboard", lambda: _TensorBoard(folder / "tensorboard")))
        if wandb:
            opened.append(("wandb", lambda: _Wandb(wandb, run_name, config or {}, folder)))
        if trackio:
            opened.append(("trackio", lambda: _Trackio(trackio, run_name, config or {})))
        for name, make in opened:
            self._open(name, make)

    def _open(self, name: str, make: Callable[[], Any]) -> None:
        try:
            self.sinks.append(make())
        except ImportError:
            warn(f"{name} is not installed (pip install 'smallgpt[{name}]'); not logging to it")
        except Exception as e:  # a logging service must never stop the run
            warn(f"{name} could not start ({type(e).__name__}: {str(e).splitlines()[0]}); "
                 "not logging to it")

    def log(self, rec: Record) -> None:
        """Write one record everywhere."""
        if not self.enabled:
            return
        assert self._file is not None
        try:
            self._file.write(json.dumps(_json_safe(rec), allow_nan=False) + "\n")
            self._file.flush()
        except OSError as e:
            raise write_error(self.folder / "metrics.jsonl", e, self.folder) from None
        for sink in list(self.sinks):
            try:
                sink.write(rec)
            except Exception as e:
                warn(f"a logging sink failed ({type(e).__name__}); dropping it")
                self.sinks.remove(sink)
        if self.on_log is not None:
            self.on_log(rec)

    def close(self, plot: bool = False) -> None:
        """Close every sink; draw ``loss_curve.png`` when ``plot`` is true."""
        if not self.enabled:
            return
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:
                warn(f"closing a logging sink failed ({type(e).__name__})")
        self.sinks = []
        if self._file is not None:
            self._file.close()
            self._file = None
        if plot:
            plot_metrics(self.folder)


def _read_curves(path: Path) -> Tuple[List[Tuple[int, float]], List[Tuple[int, float]]]:
    train_pts: List[Tuple[int, float]] = []
    val_pts: List[Tuple[int, float]] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec.get("loss"), (int, float)) and math.isfinite(rec["loss"]):
                train_pts.append((rec["step"], rec["loss"]))
            if isinstance(rec.get("val_loss"), (int, float)):
                val_pts.append((rec["step"], rec["val_loss"]))
    return train_pts, val_pts


def plot_metrics(folder: Path) -> bool:
    """Write ``loss_curve.png`` from ``metrics.jsonl``; warn and return False without
    matplotlib (``pip install 'smallgpt[plot]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warn("matplotlib is not installed (pip install 'smallgpt[plot]'); no loss_curve.png")
        return False
    train_pts, val_pts = _read_curves(folder / "metrics.jsonl")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([s for s, _ in train_pts], [v for _, v in train_pts], lw=0.8, label="train")
    if val_pts:
        ax.plot([s for s, _ in val_pts], [v for _, v in val_pts], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = folder / f".loss_curve.{os.getpid()}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, folder / "loss_curve.png")
    return True
