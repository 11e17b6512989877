"""Atomic file writes (a temporary file in the target folder, then a rename), and what a failed
write says.

Temporary files are named ``.<name>.<pid>.tmp`` so that a later process can tell those of a
dead process (killed during a save) from those of a live one, and remove them
(:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, List, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class WriteError(OSError):
    """A file could not be written (full disk, quota, permissions); the message names the file
    and says why in words (``cannot write out/ckpt_latest.pt: no space left on device``)."""

    def __init__(self, message: str, errno_: Optional[int] = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno_

    def __str__(self) -> str:
        return self.message


def write_error(path: PathLike, error: BaseException, free_dir: Optional[Path] = None) -> \
        WriteError:
    """The :class:`WriteError` for ``error`` raised while writing ``path``.

    A full disk is recognised by its errno, by the text libraries put in their own exceptions
    (safetensors: "No space left on device"), or, for errors that carry neither (torch's
    "unexpected pos"), by the free space left in ``free_dir`` at the time of the failure.
    """
    code = getattr(error, "errno", None)
    text = str(error)
    no_space = code in _NO_SPACE or "No space left" in text or "Disk quota" in text
    if not no_space and free_dir is not None:
        try:
            no_space = shutil.disk_usage(free_dir).free < (1 << 20)
        except OSError:
            pass
    if no_space:
        return WriteError(f"cannot write {path}: no space left on device", errno.ENOSPC)
    if isinstance(error, OSError) and error.strerror:
        return WriteError(f"cannot write {path}: {error.strerror}", code)
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return WriteError(f"cannot write {path}: {first}", code)


class _RecordingFile(io.RawIOBase):
    """A writable file that remembers the ``OSError`` of its underlying file: libraries that
    turn write errors into their own (torch.save's ``RuntimeError: unexpected pos``) lose the
    errno, and the caller still wants to say "no space left on device"."""

    def __init__(self, f: Any) -> None:
        super().__init__()
        self.f = f
        self.error: Optional[OSError] = None

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = e
            raise


def temporary_path(path: Path) -> Path:
    """The temporary name :func:`atomic_write` uses for ``path`` in this process."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: PathLike, write: Callable[[Any], None]) -> Path:
    """Write ``path`` so that readers never see a partial file: ``write(f)`` fills a temporary
    file in the same folder, which is flushed to disk and renamed over ``path``.

    Raises:
        WriteError: the file could not be written (the temporary is removed; an existing
            ``path`` is left as it was).
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        tmp.unlink(missing_ok=True)
        with open(tmp, "xb") as raw:
            f = _RecordingFile(raw)
            try:
                write(f)
                f.flush()
                os.fsync(raw.fileno())
            except BaseException as e:
                if f.error is not None and not isinstance(e, OSError):
                    raise f.error from None
                raise
        os.replace(tmp, path)
    except (KeyboardInterrupt, SystemExit):
        tmp.unlink(missing_ok=True)
        raise
    except BaseException as e:
        err = write_error(path, e, path.parent)
        tmp.unlink(missing_ok=True)
        raise err from None
    return path


def atomic_write_bytes(path: PathLike, chunks: Iterable[bytes]) -> Path:
    """Writes ``chunks`` to ``path`` so that readers never see a partial file
    (see :func:`atomic_write`)."""

    def write(f: Any) -> None:
        for c in chunks:
            f.write(c)

    return atomic_write(path, write)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, [text.encode("utf-8")])


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, and belongs to someone else
    except OSError:
        return True
    return True


def remove_stale_temporaries(folder: PathLike, names: Optional[Iterable[str]] = None) -> \
        List[Path]:
    """Remove the temporaries (``.<name>.<pid>.tmp``, files or folders) that processes which
    no longer run left in ``folder`` (killed during a save); only those of ``names`` when
    given. Returns what was removed."""
    removed: List[Path] = []
    folder = Path(folder)
    wanted = None if names is None else set(names)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TMP.match(p.name)
        if not m or (wanted is not None and m.group("name") not in wanted):
            continue
        if int(m.group("pid")) != os.getpid() and not pid_alive(int(m.group("pid"))):
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed
