"""Where bytes live. Every path is a URI string; local paths work now, `s3://` slots in here.

Writes are atomic: content goes to a temporary sibling and is renamed into place only when complete,
so a killed stage never leaves a half-written output that looks finished.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)


def local(uri: str | os.PathLike) -> Path:
    """The local path of a URI; remote schemes are named clearly until their backend lands."""
    s = os.fspath(uri)
    if "://" in s and not s.startswith("file://"):
        scheme = s.split("://", 1)[0]
        raise NotImplementedError(f"'{scheme}://' URIs are not supported yet: {s}")
    return Path(s.removeprefix("file://"))


@contextlib.contextmanager
def atomic_file(uri: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``uri``; rename it onto ``uri`` only if the block succeeds."""
    dest = local(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(uri: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory beside ``uri``; it replaces ``uri`` whole only if the block succeeds."""
    dest = local(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(uri: str | os.PathLike, obj) -> None:
    with atomic_file(uri) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def read_json(uri: str | os.PathLike):
    return json.loads(local(uri).read_text(encoding="utf-8"))


def file_sha256(uri: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(local(uri), "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()
