"""Atomic writes: a process killed mid-write leaves the previous state intact and nothing complete-looking."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ffnsplit.errors import FFNSplitError
from ffnsplit.fsutil import atomic_dir, atomic_path, atomic_write_text, check_output, replace_dir

WRITER = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path
    from ffnsplit.fsutil import atomic_dir, atomic_path
    # a shell without job control starts background jobs with SIGINT ignored, and Python keeps
    # an inherited "ignore": restore Ctrl-C's KeyboardInterrupt so the test sees what a user does
    signal.signal(signal.SIGINT, signal.default_int_handler)
    target, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "file":
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(b"new-partial")
                handle.flush()
                print("writing", flush=True)
                time.sleep(60)
    else:
        with atomic_dir(target, overwrite=True) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            print("writing", flush=True)
            time.sleep(60)
    """
)


def _start_writer(target: Path, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target), mode],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "writing"
    return proc


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_file_killed_mid_write_keeps_previous_content(tmp_path: Path, sig: int) -> None:
    target = tmp_path / "profile.safetensors"
    target.write_bytes(b"old-complete")
    proc = _start_writer(target, "file")
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert target.read_bytes() == b"old-complete"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != target.name]
    if sig == signal.SIGINT:  # Ctrl-C cleans up its temporary file
        assert leftovers == []
    else:  # a SIGKILL leaves at most a hidden temporary, never the target name
        assert all(name.startswith(".") and name.endswith(".tmp") for name in leftovers)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_folder_killed_mid_write_keeps_previous_folder(tmp_path: Path, sig: int) -> None:
    target = tmp_path / "compressed"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"old-complete")
    proc = _start_writer(target, "dir")
    time.sleep(0.1)
    os.kill(proc.pid, sig)
    proc.wait(timeout=30)
    assert (target / "model.safetensors").read_bytes() == b"old-complete"
    others = [p.name for p in tmp_path.iterdir() if p.name != "compressed"]
    if sig == signal.SIGINT:
        assert others == []
    else:
        assert all(name.startswith(".") and name.endswith(".partial") for name in others)


def test_exception_inside_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "x").write_text("partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_refused_without_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(FFNSplitError, match="--overwrite"), atomic_dir(target):
        pass


def test_overwrite_replaces_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
        assert (target / "old").exists()
    assert sorted(p.name for p in target.iterdir()) == ["new"]


def test_atomic_write_text_round_trip(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "plan.json"
    atomic_write_text(target, "{}\n")
    assert target.read_text() == "{}\n"
    assert [p.name for p in target.parent.iterdir()] == ["plan.json"]


def test_disk_full_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(FFNSplitError, match="no space left"), atomic_path(tmp_path / "f") as tmp:
        tmp.write_text("x")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_from_a_writer_with_its_own_error(tmp_path: Path) -> None:
    """safetensors wraps ENOSPC in its own exception type: still the disk-full line."""

    class SafetensorError(Exception):
        pass

    with pytest.raises(FFNSplitError, match="no space left"), atomic_dir(tmp_path / "o"):
        raise SafetensorError("Error while serializing: I/O error: No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_of_a_file_leaves_no_old_copy(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_text("a file where the folder goes")
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert target.is_dir()


def test_check_output_refuses_before_any_work(tmp_path: Path) -> None:
    folder, file = tmp_path / "folder", tmp_path / "file.json"
    folder.mkdir()
    file.write_text("{}")
    with pytest.raises(FFNSplitError, match=r"already exists: pass --overwrite"):
        check_output(file, "--json")
    assert check_output(file, "--json", overwrite=True) == file
    assert check_output(file, "--append", may_exist=True) == file
    with pytest.raises(FFNSplitError, match=r"is a folder: give a file path for --json"):
        check_output(folder, "--json", overwrite=True)
    with pytest.raises(FFNSplitError, match=r"is a file: give a folder path for --out"):
        check_output(file, "--out", folder=True, overwrite=True)
    with pytest.raises(FFNSplitError, match=r"is a file, not a folder: choose another --out"):
        check_output(file / "sub" / "out", "--out", folder=True)
    assert check_output(tmp_path / "new" / "deeper" / "x.json", "--json").name == "x.json"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_check_output_unwritable_folder(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(FFNSplitError, match="no write permission"):
        check_output(locked / "x.json", "--json")


def test_replace_dir_restores_the_old_folder_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "demo"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(RuntimeError), replace_dir(target, overwrite=True) as path:
        assert path == target and list(target.iterdir()) == []
        (target / "half").write_text("half")
        raise RuntimeError("step 2 failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    assert sorted(p.name for p in target.iterdir()) == ["old"]
    with replace_dir(target, overwrite=True):
        (target / "new").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    with pytest.raises(FFNSplitError, match="--overwrite"), replace_dir(target):
        pass
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError), replace_dir(fresh):
        raise RuntimeError("failed")
    assert not fresh.exists()


def test_folder_files_get_plain_modes(tmp_path: Path) -> None:
    """Writers that create private files (safetensors: 0600) still give a folder of files with
    the mode a plain open() gives."""
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "sub").mkdir()
        for name in ("a.safetensors", "sub/b.json"):
            (tmp / name).write_text("x")
            os.chmod(tmp / name, 0o600)
    plain = tmp_path / "plain"
    plain.write_text("x")
    for name in ("a.safetensors", "sub/b.json"):
        assert (target / name).stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
