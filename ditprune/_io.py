"""Safe file output: nothing ditprune did not write is ever replaced or deleted.

- :func:`atomic_file`: write beside the target, then rename over it in one step.
- :class:`OutputDir`: a run's outputs (model, recipe, metrics, report, ...) are written into a
  staging directory inside the output directory and moved into place together by ``commit``.
  A manifest (``.ditprune.json``) lists what ditprune wrote; a later run replaces only those
  entries (anything else only with ``overwrite=True``). A run that dies leaves its staging
  directory with its pid; the next run into the same directory removes it and says so, or, if
  the run died while committing, finishes its commit first. A committed directory entry is
  swapped with the old one in one step (Linux ``renameat2``), so the old or the new entry is in
  place at every instant.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import InputError

__all__ = ["atomic_file", "OutputDir", "check_output_dir", "MANIFEST", "STAGING_PREFIX"]

log = logging.getLogger(__name__)

MANIFEST = ".ditprune.json"
STAGING_PREFIX = ".ditprune-staging-"
_PID = ".pid"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _chmod_tree(root: Path) -> None:
    """Files 0666 and directories 0777, less the umask: what open() and mkdir() would give
    (temporary files and directories are created 0600/0700)."""
    umask = _umask()
    os.chmod(root, 0o777 & ~umask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~umask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~umask)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on success it is renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_manifest(path: Path, files: set[str]) -> None:
    with atomic_file(path / MANIFEST) as tmp:
        tmp.write_text(json.dumps({"files": sorted(files), "written": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))


def _read_manifest(path: Path) -> dict:
    try:
        data = json.loads((path / MANIFEST).read_text())
        return data if isinstance(data, dict) and isinstance(data.get("files"), list) else {"files": []}
    except (OSError, ValueError):
        return {"files": []}


def _inside(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies inside it (both resolved)."""
    return a == b or b in a.parents


def _probe_writable(path: Path, key: str) -> None:
    """Create ``path`` (and its parents) and a file in it, then remove whatever the probe created."""
    created = []
    p = path
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    if p.exists() and not p.is_dir():
        raise InputError(f"{key}: cannot create {path}: {p} is a file, not a directory")
    try:
        for d in reversed(created):
            d.mkdir()
        fd, probe = tempfile.mkstemp(prefix=".ditprune-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"{key}: cannot write into {path} ({e.strerror or e}); choose a writable directory") from None
    finally:
        for d in created:
            try:
                d.rmdir()
            except OSError:
                pass


def check_output_dir(path: str | os.PathLike, names: Iterable[str], protect: Iterable[str | os.PathLike] = (),
                     overwrite: bool = False, key: str = "export.output_dir") -> Path:
    """Refuse, before any work, an output directory that would lose a user's files: one that is a
    file or not writable, one equal to, inside or containing a ``protect`` path (the model's
    source), or one holding any of ``names`` that ditprune did not write (unless ``overwrite``)."""
    if "\x00" in str(path):
        raise InputError(f"{key}: the path contains a NUL byte")
    try:
        path = Path(path).expanduser().absolute()
        if path.exists() and not path.is_dir():
            raise InputError(f"{key}: {path} is a file; give a directory")
        real = path.resolve(strict=False)
    except (OSError, RuntimeError) as e:  # a symlink loop, a name too long, ...
        raise InputError(f"{key}: {path}: {getattr(e, 'strerror', None) or e}") from None
    for p in protect:
        src = Path(p).expanduser().resolve()
        if _inside(real, src) or _inside(src, real):
            how = "is" if real == src else ("lies inside" if _inside(real, src) else "contains")
            raise InputError(f"{key}: {path} {how} the model source {src}; ditprune never writes over its "
                             "input: choose another output directory")
    try:
        _probe_writable(path, key)
    except OSError as e:
        raise InputError(f"{key}: cannot write into {path} ({e.strerror or e}); choose a writable directory") from None
    if path.is_dir():
        mine = set(_read_manifest(path)["files"])
        for name in names:
            target = path / name
            if (target.exists() or target.is_symlink()) and name not in mine and not overwrite:
                raise InputError(f"{key}: {target} exists and was not written by ditprune; move it away, choose "
                                 "another output directory, or set export.overwrite=true to replace it")
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_JOURNAL = ".committing"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot."""
    try:
        import ctypes

        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def _put(staged: Path, target: Path, aside: Path) -> None:
    """Move ``staged`` to ``target``; an existing target goes to ``aside``. A file replaces its
    target in one rename; a directory is swapped with it in one step where the system can, so
    the old or the new entry is in place at every instant."""
    if not (target.exists() or target.is_symlink()):
        os.replace(staged, target)
    elif staged.is_dir() and not target.is_symlink() and target.is_dir() and _exchange(staged, target):
        os.replace(staged, aside / target.name)  # ``staged`` now holds the old entry
    elif staged.is_dir():  # no atomic swap here: the journal lets the next run finish the commit
        os.replace(target, aside / target.name)
        os.replace(staged, target)
    else:
        os.replace(staged, target)


def _roll_forward(path: Path, staging: Path) -> list[str]:
    """Finish the commit of a run that died while committing (its outputs were complete)."""
    names = json.loads((staging / _JOURNAL).read_text())["names"]
    aside = staging / ".replaced"
    aside.mkdir(exist_ok=True)
    for name in names:
        if (staging / name).exists() or (staging / name).is_symlink():
            _put(staging / name, path / name, aside)
    _write_manifest(path, set(_read_manifest(path)["files"]) | set(names))
    return names


def _clean_stale(path: Path) -> None:
    """Finish or remove the staging directories of runs that died (same host, pid gone): one that
    died while committing has its commit finished (its outputs were complete), any other is
    removed (it never touched what was in place); refuse while a live run writes here."""
    if not path.is_dir():
        return
    for d in sorted(path.glob(STAGING_PREFIX + "*")):
        if not d.is_dir():
            continue
        try:
            pid_s, host = (d / _PID).read_text().split(maxsplit=1)
            pid = int(pid_s)
        except (OSError, ValueError):
            log.warning("left alone: %s (a ditprune staging directory without a readable pid file)", d)
            continue
        if host.strip() != socket.gethostname():
            log.warning("left alone: %s (staging directory of a run on host %s)", d, host.strip())
        elif pid != os.getpid() and _alive(pid):
            raise InputError(f"another ditprune run (pid {pid}) is writing into {path}; wait for it or choose "
                             "another output directory")
        else:
            if (d / _JOURNAL).is_file():
                names = _roll_forward(path, d)
                log.warning("finished the commit of an interrupted run (pid %d): %s", pid, ", ".join(names))
            shutil.rmtree(d, ignore_errors=True)
            log.warning("removed %s: the leftovers of an interrupted run (pid %d)", d, pid)


class OutputDir:
    """The outputs of one run, written into ``path/.ditprune-staging-*`` and committed together.

    ``names`` are the entries (files or directories, directly under ``path``) the run may write;
    they are checked at construction, before any work. Use as a context manager: on success every
    staged entry replaces its target (old entries are moved aside first, then deleted), the
    manifest is updated and the staging directory removed; on error the staging directory is
    removed and nothing in ``path`` changes.
    """

    def __init__(self, path: str | os.PathLike, names: Iterable[str], protect: Iterable[str | os.PathLike] = (),
                 overwrite: bool = False, key: str = "export.output_dir", persistent: Iterable[str] = ()):
        self.names = list(names)
        self.persistent_names = list(persistent)
        self.overwrite = overwrite
        self.path = check_output_dir(path, self.names + self.persistent_names, protect, overwrite, key)
        self.staging: Path | None = None

    def __enter__(self) -> "OutputDir":
        _clean_stale(self.path)
        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        if self.persistent_names:  # written in place, kept if the run dies: recorded as ditprune's right away
            for name in self.persistent_names:
                (self.path / name).mkdir(exist_ok=True)
            self._created = False
            _write_manifest(self.path, set(_read_manifest(self.path)["files"]) | set(self.persistent_names))
        self.staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.path))
        (self.staging / _PID).write_text(f"{os.getpid()} {socket.gethostname()}\n")
        return self

    def persistent(self, name: str) -> Path:
        """Where entry ``name`` lives: written in place (e.g. a cache a later run reuses)."""
        if name not in self.persistent_names:
            raise ValueError(f"{name!r} is not one of this run's persistent outputs {self.persistent_names}")
        return self.path / name

    def __truediv__(self, name: str) -> Path:
        """Where to write entry ``name`` now (inside the staging directory)."""
        if name not in self.names:
            raise ValueError(f"{name!r} is not one of this run's declared outputs {self.names}")
        return self.staging / name

    def final(self, name: str) -> Path:
        """Where entry ``name`` will be once committed."""
        return self.path / name

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.commit()
        finally:
            if self.staging is not None:
                shutil.rmtree(self.staging, ignore_errors=True)
                self.staging = None
            if exc_type is not None and self._created:
                try:
                    self.path.rmdir()  # a directory this run made, left empty by its failure
                except OSError:
                    pass

    def commit(self) -> None:
        staged = [p.name for p in self.staging.iterdir() if p.name != _PID]
        _chmod_tree(self.staging)
        mine = set(_read_manifest(self.path)["files"])
        aside = self.staging / ".replaced"
        aside.mkdir()
        for name in staged:  # re-checked: something may have appeared since the run started
            target = self.path / name
            if (target.exists() or target.is_symlink()) and name not in mine and not self.overwrite:
                raise InputError(f"{target} appeared during the run and was not written by ditprune; "
                                 f"nothing was written (outputs were in {self.staging})")
        (self.staging / _JOURNAL).write_text(json.dumps({"names": staged}))  # from here on, finished if killed
        for name in staged:
            _put(self.staging / name, self.path / name, aside)
        _write_manifest(self.path, (mine | set(staged) | set(self.persistent_names)) & {p.name for p in self.path.iterdir()})


def strict_json(obj: Any, indent: int = 1, default=None) -> str:
    """JSON that jq and browsers accept: non-finite numbers (a dense model's infinite PSNR) become
    null. ``default`` as in :func:`json.dumps`."""

    def clean(x):
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), indent=indent, default=default, allow_nan=False)
