"""Atomic file and folder writes: a reader sees the old state or the complete new one, never half.

Every file ffnsplit writes goes through here: written under a temporary name in the same folder,
flushed to disk, then renamed into place (rename is atomic on POSIX within one file system).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ffnsplit.errors import FFNSplitError


def _default_mode(is_dir: bool) -> int:
    """The permissions a plain open()/mkdir() would give (mkstemp/mkdtemp use 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


def disk_full_message(path: str | os.PathLike) -> str:
    return f"no space left on the disk while writing {path}: free some space or write elsewhere"


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC, also as raised by writers that wrap it in their own error (safetensors)."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    return "No space left on device" in str(exc)


def refuse_existing(path: str | os.PathLike, overwrite: bool) -> None:
    """The one refusal of an existing output when --overwrite was not given."""
    if not overwrite and Path(path).exists():
        raise FFNSplitError(f"{path} already exists: pass --overwrite to replace it")


def _set_aside(path: Path) -> Path:
    """Rename an output being replaced to a hidden name beside it; returns that name."""
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    return old


def _writable_folder(path: Path) -> Path:
    """The folder that would receive `path` (its nearest existing ancestor: missing parents are
    created on the way)."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_output(
    path: str | os.PathLike,
    option: str,
    *,
    folder: bool = False,
    overwrite: bool = False,
    may_exist: bool = False,
    inputs: tuple[str | os.PathLike | None, ...] = (),
) -> Path:
    """Refuse an output path before any work is done: a file where a folder is wanted or the
    reverse, an existing path without `overwrite` (unless `may_exist`), one that is or holds an
    input of the command or the current folder (replacing it would destroy them), or a
    destination that cannot be written (read-only file system, no permission, a file in the way
    of a parent). Returns the path with `~` expanded."""
    path = Path(path).expanduser()
    if path.exists():
        if folder and not path.is_dir():
            raise FFNSplitError(f"{path} is a file: give a folder path for {option}")
        if not folder and path.is_dir():
            raise FFNSplitError(f"{path} is a folder: give a file path for {option}")
        refuse_existing(path, overwrite or may_exist)
        target = path.resolve()
        for other in (*inputs, Path.cwd()):
            if other is None or not Path(other).expanduser().exists():
                continue
            held = Path(other).expanduser().resolve()
            if held == target or target in held.parents:
                what = "the current folder" if other == Path.cwd() else str(other)
                raise FFNSplitError(
                    f"{option} {path} is or holds {what}, which writing it would destroy: "
                    f"choose another {option}"
                )
    parent = _writable_folder(path)
    if not parent.is_dir():
        raise FFNSplitError(f"{parent} is a file, not a folder: choose another {option}")
    if not os.access(parent, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only(parent) else "no write permission"
        raise FFNSplitError(f"cannot write into {parent} ({reason}): choose another {option}")
    return path


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync and rename it onto `path`.

    On any exception (Ctrl-C included) the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, _default_mode(is_dir=False))
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if _disk_full(exc):
            raise FFNSplitError(disk_full_message(path)) from exc
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success rename it onto `path`.

    An interrupted run leaves only a hidden `.NAME.*.partial` folder (removed on the way out when
    possible), never a folder at `path` that looks complete. With `overwrite`, an existing `path`
    is replaced only once the new folder is complete.
    """
    path = Path(path)
    refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    os.chmod(tmp, _default_mode(is_dir=True))
    try:
        yield tmp
        _plain_modes(tmp)
        if path.exists():
            old = _set_aside(path)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(exc):
            raise FFNSplitError(disk_full_message(path)) from exc
        raise


def _plain_modes(folder: Path) -> None:
    """Give every file in `folder` the mode a plain open() would (some writers, safetensors
    among them, create private 0600 files)."""
    mode = _default_mode(is_dir=False)
    for file in folder.rglob("*"):
        if file.is_file() and not file.is_symlink():
            os.chmod(file, mode)


def _remove(path: Path) -> None:
    """Remove a file or a folder tree, ignoring errors (what --overwrite replaced)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def replace_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield `path` itself as a new, empty folder for a multi-step job whose files must keep their
    real paths (they name each other). On failure the new folder is removed and the one it
    replaced (with `overwrite`) is put back; on success the replaced one is deleted."""
    path = Path(path)
    refuse_existing(path, overwrite)
    old = _set_aside(path) if path.exists() else None
    try:
        path.mkdir(parents=True)
        yield path
    except BaseException as exc:
        _remove(path)
        if old is not None:
            os.replace(old, path)
        if _disk_full(exc):
            raise FFNSplitError(disk_full_message(path)) from exc
        raise
    if old is not None:
        _remove(old)
