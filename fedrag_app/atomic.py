"""Writes that a crash cannot leave half done: write aside, fsync, rename, fsync the folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX: the directory entry lives in the folder)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """``write(f)`` fills a temporary sibling, which then replaces ``path`` in one rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder below ``folder`` (a checkpoint before it is swapped in)."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(Path(root) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


DATA_FILES = {"corpus.jsonl", "train.jsonl", "eval.jsonl"}


def check_data_root(out: Path, marker: str, prefix: str, overwrite: bool, what: str) -> bool:
    """True when ``out`` holds a previous ``what`` (its ``marker`` file, ``prefix*`` client
    folders of data files, nothing else) to replace; refuses anything else non-empty."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    entries = sorted(out.iterdir())
    if not entries:
        return False
    if not (out / marker).is_file():
        raise ValueError(f"--out {out}: not empty and not a previous {what} ({marker}); refusing")
    if not overwrite:
        raise ValueError(f"--out {out}: holds a previous {what}; pass --overwrite to replace it")
    foreign = [
        e.name
        for e in entries
        if e.name != marker
        and not (
            e.is_dir() and e.name.startswith(prefix) and {f.name for f in e.iterdir()} <= DATA_FILES
        )
    ]
    if foreign:
        raise ValueError(f"--out {out}: holds files a {what} did not write {foreign[:5]}; refusing")
    return True


def publish_data_root(
    out: Path, build: Callable[[Path], None], marker: str, prefix: str, overwrite: bool, what: str
) -> None:
    """``build(tmp)`` fills a hidden sibling of ``out`` (and writes ``marker``), which then
    replaces ``out`` whole: a failure leaves ``out`` as it was, never half written."""
    check_data_root(out, marker, prefix, overwrite, what)  # before the work: refuse quickly
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{prefix}", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a data root is an ordinary folder
    try:
        build(tmp)
        if not (tmp / marker).is_file():
            raise RuntimeError(f"{what}: the build wrote no {marker}")
        fsync_tree(tmp)
        if check_data_root(out, marker, prefix, overwrite, what):  # again: nothing new appeared
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / "previous")
            tmp.rename(out)
            fsync_dir(out.parent)
            shutil.rmtree(old)
        else:
            tmp.replace(out)  # an empty folder or nothing: replaced in one rename
            fsync_dir(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
