"""Where bytes live. Every path is a URI string: a local path, or ``s3://bucket/key`` (winnow.s3).
Readers go through ``exists``/``read_bytes``/``open_read``/``list_names``/``source``, which take
either; ``local()`` is for code that needs a filesystem path and names remote URIs clearly.

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
    """The local path of a URI; a remote one here means this code path reads local files only."""
    s = os.fspath(uri)
    if "://" in s and not s.startswith("file://"):
        scheme = s.split("://", 1)[0]
        raise NotImplementedError(f"this step reads local paths only, not '{scheme}://': {s}")
    return Path(s.removeprefix("file://"))


def is_remote(uri: str | os.PathLike) -> bool:
    return os.fspath(uri).startswith("s3://")


def join(uri: str | os.PathLike, *names: str) -> str | Path:
    """A child of a directory URI: a Path locally, an ``s3://`` string remotely."""
    if is_remote(uri):
        return "/".join([os.fspath(uri).rstrip("/"), *names])
    return local(uri).joinpath(*names)


def exists(uri: str | os.PathLike) -> bool:
    from winnow import s3

    return s3.exists(os.fspath(uri)) if is_remote(uri) else local(uri).exists()


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The whole object; a missing one raises FileNotFoundError whatever the backend (s3.S3NotFound is one)."""
    from winnow import s3

    return s3.read_bytes(os.fspath(uri)) if is_remote(uri) else local(uri).read_bytes()


@contextlib.contextmanager
def open_read(uri: str | os.PathLike):
    """A sequential binary stream (remote objects are read while they download)."""
    from winnow import s3

    if not is_remote(uri):
        with open(local(uri), "rb") as fh:
            yield fh
        return
    body = s3.open_stream(os.fspath(uri))
    try:
        yield body
    finally:
        body.close()


def list_names(uri: str | os.PathLike) -> list[str]:
    """File names directly in a directory (or under an s3 prefix), sorted."""
    from winnow import s3

    if is_remote(uri):
        return s3.list_names(os.fspath(uri))
    root = local(uri)
    if not root.is_dir():
        raise FileNotFoundError(f"directory not found: {uri}")
    return sorted(p.name for p in root.iterdir() if p.is_file())


def source(uri: str | os.PathLike):
    """What pyarrow, numpy and zipfile can open: the local path, or the remote object's bytes."""
    import io

    return io.BytesIO(read_bytes(uri)) if is_remote(uri) else local(uri)


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
    return json.loads(read_bytes(uri).decode("utf-8"))


def file_sha256(uri: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(local(uri), "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


CACHE = Path(".winnow/cache")


def cache_local(uri: str | os.PathLike) -> Path:
    """A local copy of a remote directory (every key under the prefix) in ``.winnow/cache/s3/...``,
    for readers that need files (open_clip_train's webdataset, evaluation sets); each file is
    downloaded atomically and skipped when already there with the same size. Local paths pass through."""
    from winnow import s3

    if not is_remote(uri):
        return local(uri)
    bucket, prefix = s3.split(os.fspath(uri))
    dest = CACHE / "s3" / bucket / prefix.rstrip("/")
    for name, size in s3.list_sizes(os.fspath(uri)).items():   # the listing carries sizes: no HEAD per file
        target = dest / name
        if not (target.exists() and target.stat().st_size == size):
            s3.download(f"{os.fspath(uri).rstrip('/')}/{name}", target)
    return dest


def keyed_work_dir(root: str | os.PathLike, key: str) -> Path:
    """``root/key``, created; other keys' directories under ``root`` are leftovers of runs with other
    inputs that will never be resumed, so they are removed."""
    base = local(root)
    for old in (base.iterdir() if base.exists() else []):
        if old.name != key:
            shutil.rmtree(old, ignore_errors=True)
    (base / key).mkdir(parents=True, exist_ok=True)
    return base / key
