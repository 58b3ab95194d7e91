"""Atomic writes: every output appears whole or not at all.

A crash or Ctrl-C mid-write must never leave a truncated file that a later
step would read as valid, so each writer fills a temporary sibling and renames.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    # mkstemp/mkdtemp create 0600/0700 for safety while writing; the finished output
    # gets the permissions a plain open() would have given, so servers can read it.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(root: str | os.PathLike) -> None:
    """Widen every file and folder under ``root`` to what the umask allows (0644/0755 under 022).

    safetensors (0.8) writes its files through a private temporary file, so they come out 0600;
    a model folder must be readable by the group, like any Hugging Face save, or a server running
    as another user cannot load it. Bits are only added, never removed.
    """
    mask = _umask()
    for dirpath, dirnames, filenames in os.walk(root):
        for name, allowed in [(n, 0o666) for n in filenames] + [(n, 0o777) for n in dirnames]:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            mode = os.stat(path).st_mode & 0o7777
            if mode | (allowed & ~mask) != mode:
                os.chmod(path, mode | (allowed & ~mask))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    # sort_keys + fixed separators: byte-identical output for identical content.
    write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; swap it in on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        make_readable(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
