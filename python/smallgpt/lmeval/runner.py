"""Running lm-eval tasks on a :class:`~smallgpt.lmeval.SmallGPTLM`: task lookup (names, YAML
files, ``--include-path`` folders), local data files, the results JSON and its summary.

Task YAMLs that read local files (``dataset_path: json`` with ``dataset_kwargs.data_files``)
may name those files relative to the YAML's own folder: for a task named on the command line
(or a YAML file given by path), a relative ``data_files`` / ``data_dir`` entry that exists
next to the YAML is made absolute before lm-eval sees it (lm-eval itself resolves them against
the working directory, which it still does for paths that only exist there).
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

from smallgpt._io import atomic_write_text

if TYPE_CHECKING:
    import os

    from lm_eval.tasks import TaskManager

    from smallgpt.lmeval.model import SmallGPTLM

__all__ = ["TaskError", "evaluate_tasks", "load_tasks", "quiet_lm_eval", "summarize",
           "task_manager", "write_results"]

PathLike = Union[str, "os.PathLike[str]"]


class TaskError(ValueError):
    """A task that does not exist or cannot be loaded (the message names it and says why)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def task_manager(include_path: Sequence[PathLike] = (),
                 names: Optional[Sequence[str]] = None) -> TaskManager:
    """lm-eval's :class:`TaskManager` over its own tasks and the folders ``include_path``.

    Indexing lm-eval's own tasks reads thousands of YAML files (seconds to tens of seconds):
    when every one of ``names`` is a task of ``include_path`` or a YAML file of a task, the
    manager indexes ``include_path`` only.

    Raises:
        TaskError: an include path that is not a folder.
    """
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind, TaskIndex

    paths = [str(p) for p in include_path]
    for p in paths:
        if not Path(p).is_dir():
            raise TaskError(f"--include-path {p}: not a folder")
    if names:
        local = TaskManager(include_path=paths or None, include_defaults=False)

        def is_local_task(name: str) -> bool:
            entry = local.task_index.get(name)
            if entry is None and Path(name).suffix in (".yaml", ".yml") and Path(name).is_file():
                try:
                    entry = TaskIndex.entry_from_path(Path(name))
                except Exception:  # noqa: BLE001 - reported when the task is loaded
                    return False
            return entry is not None and entry.kind is Kind.TASK

        if all(is_local_task(n) for n in names):
            return local
    return TaskManager(include_path=paths or None)


def _local(value: Any, folder: Path) -> Any:
    """``value`` (a path, or a list / dict of them) with relative paths that exist in
    ``folder`` made absolute."""
    if isinstance(value, list):
        return [_local(v, folder) for v in value]
    if isinstance(value, dict):
        return {k: _local(v, folder) for k, v in value.items()}
    if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
        here = folder / value
        if here.exists() or not Path(value).exists():
            return str(here)
    return value


def _spec(name: str, tm: TaskManager) -> Union[str, Dict[str, Any]]:
    """What to hand :meth:`TaskManager.load` for ``name``: the name itself, or the task's
    config with its local data paths resolved against the YAML's folder."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = tm.task_index.get(name)
    if entry is None:
        path = Path(name)
        if path.suffix in (".yaml", ".yml") and path.is_file():
            yaml_path = path.resolve()
        else:
            close = difflib.get_close_matches(name, tm.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise TaskError(f"unknown task {name!r}: not an lm-eval task, group or tag, nor a "
                            f"YAML file{hint}; add your own with --include-path DIR")
    elif entry.kind is Kind.TASK and entry.yaml_path is not None:
        yaml_path = entry.yaml_path
    else:
        return name
    try:
        cfg = load_yaml(yaml_path, resolve_func=True)
    except Exception as e:  # noqa: BLE001 - user files: yaml, includes, !function imports
        raise TaskError(f"task {name}: cannot read {yaml_path}: {_first_line(e)}") from None
    kwargs = cfg.get("dataset_kwargs")
    if "task" not in cfg or not isinstance(kwargs, dict) or not (
            {"data_files", "data_dir"} & set(kwargs)):
        return name if entry is not None else str(yaml_path)
    cfg["dataset_kwargs"] = {k: _local(v, yaml_path.parent) if k in ("data_files", "data_dir")
                             else v for k, v in kwargs.items()}
    return cfg


def load_tasks(names: Sequence[str], tm: TaskManager) -> List[Any]:
    """Build the tasks (and groups) ``names``: lm-eval names, tags, groups, or YAML files.

    Data sets are read here (from the Hugging Face hub when a task names one, from local files
    when its YAML does), so a task whose data cannot be read fails here, before any scoring.

    Raises:
        TaskError: an unknown name, or a task whose config or data cannot be loaded.
    """
    built: List[Any] = []
    for name in names:
        spec = _spec(name, tm)
        try:
            loaded = tm.load(spec)
        except Exception as e:  # noqa: BLE001 - datasets, pyarrow, jinja: all user data
            raise TaskError(f"task {name}: cannot load it: {_first_line(e)}") from None
        key = spec["task"] if isinstance(spec, dict) else name
        if key in loaded["groups"]:
            built.append(loaded["groups"][key])
        elif key in loaded["tasks"]:
            built.append(loaded["tasks"][key])
        else:  # a tag, or a YAML file: every task it made
            built.extend(loaded["tasks"].values())
    return built


def evaluate_tasks(
    lm: SmallGPTLM,
    names: Sequence[str],
    *,
    include_path: Sequence[PathLike] = (),
    limit: Optional[int] = None,
    num_fewshot: Optional[int] = None,
    log_samples: bool = False,
    model_args: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Run lm-eval's ``simple_evaluate`` on ``lm``; returns its results dict completed as
    ``lm_eval --output_path`` completes it before writing (``task_hashes`` and the run's
    general configuration: start/end time, model name, ...).

    Raises:
        TaskError: see :func:`load_tasks`.
        ValueError: ``limit < 1`` or ``num_fewshot < 0``.
    """
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 (or None for every example), got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
    tm = task_manager(include_path, names)
    tasks = load_tasks(names, tm)
    tracker = EvaluationTracker()
    results = lm_eval.simple_evaluate(
        model=lm, model_args=model_args, tasks=tasks, task_manager=tm, limit=limit,
        num_fewshot=num_fewshot, log_samples=log_samples, evaluation_tracker=tracker)
    assert results is not None  # a single process is rank 0
    tracker.general_config_tracker.log_end_time()
    results["task_hashes"] = {}
    results.update(asdict(tracker.general_config_tracker))
    return results


def summarize(results: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    """Task -> metric -> value from lm-eval's results (``acc,none`` becomes ``acc``; other
    filters keep their suffix; aliases and "N/A" standard errors are left out)."""
    out: Dict[str, Dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, flt = key.partition(",")
            row[metric if flt in ("", "none") else key] = value
        out[task] = row
    return out


def write_results(path: PathLike, results: Dict[str, Any]) -> Path:
    """Write lm-eval's results JSON to ``path`` atomically (no per-sample logs), in the
    format ``lm_eval --output_path`` writes."""
    from lm_eval.utils import handle_non_serializable

    clean = {k: v for k, v in results.items() if k != "samples"}
    text = json.dumps(clean, indent=2, default=handle_non_serializable, ensure_ascii=False)
    return atomic_write_text(path, text + "\n")


def quiet_lm_eval(level: int = logging.WARNING) -> None:
    """lm-eval logs every task it builds at INFO; keep its log to ``level`` and above."""
    logging.getLogger("lm_eval").setLevel(level)
