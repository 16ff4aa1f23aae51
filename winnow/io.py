"""Where bytes live. Every path is a URI string: a local path, or ``s3://bucket/key`` (winnow.s3).
Readers go through ``exists``/``read_bytes``/``open_read``/``list_names``/``source``, which take
either; ``local()`` is for code that needs a filesystem path and names remote URIs clearly.

Writes are atomic and durable: content goes to a temporary sibling ``.<name>.<host>-<pid>-<rand>.tmp``,
is fsynced, renamed into place only when complete, and the directory is fsynced after the rename,
so a killed stage (or a power loss) never leaves a half-written output that looks finished. SIGTERM
during a write unwinds it (the temporary sibling is removed); what a SIGKILL leaves is removed by
the next atomic write into that directory, once the writer's process is gone (:func:`sweep_stale`).

Names that come from outside (S3 keys, manifest entries) become local paths only through
:func:`safe_join`, which refuses any that would resolve outside the destination (:class:`UnsafePath`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

from winnow.errors import WinnowError

_UMASK = os.umask(0)
os.umask(_UMASK)


class UnsafePath(WinnowError, ValueError):
    """A name from outside (an S3 key, a manifest entry, a tar member) that would resolve outside
    its destination directory, or is not a plain relative path."""


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


def check_relative(name: str, what: str = "name") -> list[str]:
    """The segments of a relative POSIX name that stays inside any directory it is joined to:
    no leading ``/``, no empty, ``.`` or ``..`` segment, no backslash or NUL. Raises UnsafePath."""
    if not isinstance(name, str) or not name:
        raise UnsafePath(f"{what} {name!r} is empty or not a string")
    if "\0" in name or "\\" in name:
        raise UnsafePath(f"{what} {name!r} contains a NUL or backslash")
    if name.startswith("/"):
        raise UnsafePath(f"{what} {name!r} is an absolute path")
    parts = name.split("/")
    bad = [p for p in parts if p in ("", ".", "..")]
    if bad:
        raise UnsafePath(f"{what} {name!r} has a {bad[0] or 'empty'!r} segment (it would not stay inside its destination)")
    return parts


def safe_join(root: str | os.PathLike, *names: str, what: str = "name") -> Path:
    """``root/name/...`` for untrusted relative names (S3 keys, manifest entries), refusing any
    that would land outside ``root`` (``..``, an absolute path, ``a//b``, a symlink inside ``root``
    that points out of it). Raises UnsafePath naming the offending name."""
    base = Path(root)
    out = base
    for name in names:
        out = out.joinpath(*check_relative(name, what))
    real_root = os.path.realpath(base)
    real = os.path.realpath(out)
    if os.path.commonpath([real_root, real]) != real_root:
        raise UnsafePath(f"{what} {'/'.join(names)!r} resolves to {real}, outside {base}")
    return out


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


# --- temporary files: owned, swept when their owner is gone ------------------------------------

HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TMP = re.compile(r"^\.(?P<name>.+)\.(?:(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{12}|[a-z0-9_]{8}|[0-9a-f]{32})\.tmp$")
_OLD = re.compile(r"^\.(?P<name>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{12}\.old$")
LEGACY_STALE_S = 3600.0          # a temp file without an owner (older winnow, other host) is stale after this
SWEEP_EVERY_S = 60.0             # a directory is swept at most this often per process
_swept: dict[str, float] = {}
_swept_lock = threading.Lock()


def owner_token() -> str:
    """``<host>-<pid>``: names a temporary file's (or S3 key's) writing process."""
    return f"{HOST}-{os.getpid()}"


def is_temp_name(name: str) -> bool:
    """A temp file or directory of an atomic writer (winnow's own, or a killed one's)."""
    return bool(_TMP.match(name))


def temp_name(name: str) -> str:
    """A temporary sibling name for ``name`` that records its owner: ``.<name>.<host>-<pid>-<rand>.tmp``."""
    return f".{name}.{owner_token()}-{uuid.uuid4().hex[:12]}.tmp"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_gone(host: str | None, pid: str | int | None, mtime: float, legacy_stale_s: float = LEGACY_STALE_S) -> bool:
    """Whether a temporary file's writer is certainly gone: on this host, its process is dead; on
    another host (or with no recorded owner), it has not been touched for ``legacy_stale_s``."""
    if host == HOST and pid is not None:
        return int(pid) != os.getpid() and not pid_alive(int(pid))
    return time.time() - mtime > legacy_stale_s


def sweep_stale(directory: str | os.PathLike, legacy_stale_s: float = LEGACY_STALE_S) -> list[str]:
    """Remove the temporary siblings (``.<name>.*.tmp`` files and directories, ``.<name>.<owner>.old``
    directories of an interrupted atomic_dir) that a killed writer left in ``directory``. A temp
    entry goes when its owner process is dead (same host) or, without an owner, when it is older
    than ``legacy_stale_s``. An ``.old`` of a dead writer whose target is missing is put back (the
    swap was cut between its two renames). Returns the names removed."""
    d = Path(directory)
    removed = []
    try:
        entries = list(os.scandir(d))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    names = {e.name for e in entries}
    for e in entries:
        if not e.name.startswith("."):
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        old = _OLD.match(e.name)
        if old and e.is_dir(follow_symlinks=False):
            if not owner_gone(old["host"], old["pid"], st.st_mtime, legacy_stale_s):
                continue
            if old["name"] in names:
                _remove(d / e.name)
                removed.append(e.name)
            else:
                os.replace(d / e.name, d / old["name"])    # the previous version: the new one never landed
            continue
        m = _TMP.match(e.name)
        if not m or not owner_gone(m["host"], m["pid"], st.st_mtime, legacy_stale_s):
            continue
        _remove(d / e.name)
        removed.append(e.name)
    return removed


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    except OSError:
        pass


def _sweep_once(directory: Path) -> None:
    key = os.path.abspath(directory)
    now = time.monotonic()
    with _swept_lock:
        if now - _swept.get(key, -1e18) < SWEEP_EVERY_S:
            return
        _swept[key] = now
    sweep_stale(directory)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (a rename into it) durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file, then every directory (deepest first) of a tree."""
    dirs = []
    for dirpath, _, files in os.walk(root):
        dirs.append(dirpath)
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                fsync_file(p)
    for d in reversed(dirs):
        fsync_dir(d)


@contextlib.contextmanager
def terminate_unwinds() -> Iterator[None]:
    """While the block runs, SIGTERM raises SystemExit(143) in the main thread (so ``finally``
    blocks remove temporary files) instead of killing the process outright. Only where SIGTERM has
    its default action; elsewhere (another handler, a worker thread) nothing changes."""
    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    installed = False
    if threading.current_thread() is threading.main_thread():
        try:
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _exit)
                installed = True
        except (ValueError, OSError):
            installed = False
    try:
        yield
    finally:
        if installed and signal.getsignal(signal.SIGTERM) is _exit:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


BOOT_ID = _boot_id()
# A job's per-unit files (outputs, markers, derived scratch) skip fsync where a reboot can be told
# apart: winnow.jobs.WorkDir discards a work directory written before the last boot, so a power cut
# never leaves a marker whose outputs were lost. Elsewhere they are fsynced like every other write.
UNIT_DURABLE = not BOOT_ID


@contextlib.contextmanager
def atomic_file(uri: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``uri``; fsync it and rename it onto ``uri`` only if the block
    succeeds, then fsync the directory. Stale temp siblings of killed writers are swept first.
    ``durable=False`` skips both fsyncs: still atomic against a killed process (the page cache
    outlives it), not against a power cut — for a job's per-unit files, which winnow.jobs discards
    after a reboot."""
    dest = local(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(dest.parent)
    tmp = dest.parent / temp_name(dest.name)
    with terminate_unwinds():
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)   # the umask applies, as for open()
        os.close(fd)
        try:
            yield tmp
            if durable:
                fsync_file(tmp)
            os.replace(tmp, dest)
            if durable:
                fsync_dir(dest.parent)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(uri: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory beside ``uri``; it replaces ``uri`` whole only if the block succeeds
    (every file and directory fsynced first, the parent after). Stale temp siblings are swept first."""
    dest = local(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(dest.parent)
    tmp = dest.parent / temp_name(dest.name)
    with terminate_unwinds():
        os.mkdir(tmp, 0o777)
        try:
            yield tmp
            fsync_tree(tmp)
            if dest.exists():
                old = dest.with_name(temp_name(dest.name)[:-len(".tmp")] + ".old")
                os.replace(dest, old)
                os.replace(tmp, dest)
                fsync_dir(dest.parent)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dest)
                fsync_dir(dest.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``dst`` as a hard link to ``src`` (no second copy of the bytes), or a copy where links cannot
    be made (another file system). Unlike a move, ``src`` stays: a work directory whose finished
    units are handed to an output that a kill then never commits still holds them on resume."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_json(uri: str | os.PathLike, obj, durable: bool = True) -> None:
    with atomic_file(uri, durable) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def read_json(uri: str | os.PathLike):
    return json.loads(read_bytes(uri).decode("utf-8"))


def file_sha256(uri: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(local(uri), "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


CACHE = Path(".winnow/cache")


def cache_dir(uri: str) -> Path:
    """Where :func:`cache_local` keeps a remote prefix: ``.winnow/cache/s3/<bucket>/<prefix>``; a
    bucket or prefix that would resolve outside the cache is refused (s3.UnsafeKey)."""
    from winnow import s3

    bucket, prefix = s3.split(uri)
    prefix = prefix.rstrip("/")
    try:
        return safe_join(CACHE / "s3", bucket, *([prefix] if prefix else []), what="S3 location")
    except UnsafePath as exc:
        raise s3.UnsafeKey(f"{uri}: {exc}") from None


def cache_local(uri: str | os.PathLike) -> Path:
    """A local copy of a remote directory (every key under the prefix) in ``.winnow/cache/s3/...``,
    for readers that need files (open_clip_train's webdataset, evaluation sets); each file is
    downloaded atomically and skipped when already there with the same size and ETag. Every key must resolve
    inside the copy: one that would not (``..``, ``prefix//abs``) refuses the whole copy with
    s3.UnsafeKey before anything is downloaded. A prefix published by winnow (its ``_SUCCESS.json``
    pointer) is read through the pointer: the current version's files, each verified against the
    manifest's sha256. Local paths pass through."""
    from winnow import s3

    if not is_remote(uri):
        return local(uri)
    uri = os.fspath(uri).rstrip("/")
    dest = cache_dir(uri)
    from winnow import publish

    if publish.is_published_dir(uri):
        return publish.download_output(uri, dest)
    # the listing carries sizes and ETags (no HEAD per file); an empty key ending in "/" is a folder
    # marker (the S3 console makes them), not a file
    listing = {n: v for n, v in s3.list_objects(uri).items() if not (n.endswith("/") and v[0] == 0)}
    targets = {}
    for name in listing:
        try:
            targets[name] = safe_join(dest, name, what="S3 key")
        except UnsafePath as exc:
            raise s3.UnsafeKey(f"refusing to copy {uri}: {exc}") from None
        parts = name.split("/")
        clash = next((a for a in ("/".join(parts[:i]) for i in range(1, len(parts))) if a in listing), None)
        if clash is not None:   # on a file system one path cannot be a file and a folder
            raise s3.S3Error(f"cannot copy {uri}: key {clash!r} is an object and also a folder of {name!r}")
    # the ETag each cached file was downloaded at: an object rewritten with the same size is fetched again
    etags_file = dest.parent / f".{dest.name}.etags.json"
    etags = json.loads(etags_file.read_text()) if etags_file.is_file() else {}
    for name, (size, etag) in listing.items():
        target = targets[name]
        if not (target.is_file() and target.stat().st_size == size and etags.get(name) == etag):
            s3.download(f"{uri}/{name}", target)
            etags[name] = etag
    write_json(etags_file, {n: etags[n] for n in listing if n in etags})
    keep = set(targets.values())
    for p in (dest.rglob("*") if dest.exists() else []):     # what the prefix no longer holds
        if p.is_file() and p not in keep and not _TMP.match(p.name):
            p.unlink(missing_ok=True)
    return dest


# --- keyed work directories: one per set of inputs, each owned by its process -------------------

OTHER_HOST_STALE_S = 7 * 24 * 3600.0


def _proc_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot, /proc), so a reused pid is not taken
    for the process that recorded it; None where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owners(base: Path) -> Path:
    """Where the owners of ``base``'s keyed directories are recorded: beside ``base``, never inside
    it (a job may move its work directory's files into its output)."""
    return base.parent / f".{base.name}.owners"


def _owner_record() -> dict:
    return {"host": HOST, "hostname": socket.gethostname(), "pid": os.getpid(),
            "start": _proc_start(os.getpid()), "since": time.time()}


def _owner_alive(record: Path) -> bool:
    """Whether the process that owns a keyed directory still runs (this host: its pid with the
    same start time; another host: the record is younger than a week)."""
    try:
        o = json.loads(record.read_text())
        mtime = record.stat().st_mtime
    except (FileNotFoundError, ValueError, OSError):
        return False
    if o.get("host") != HOST:
        return time.time() - mtime < OTHER_HOST_STALE_S
    pid = int(o.get("pid", -1))
    if pid == os.getpid():
        return True
    if pid <= 0 or not pid_alive(pid):
        return False
    return o.get("start") is None or _proc_start(pid) in (None, o.get("start"))


def keyed_work_dir(root: str | os.PathLike, key: str) -> Path:
    """``root/key``, created and recorded as this process's (``root/../.<root>.owners/<key>.json``:
    host, pid and its start time). Other keys' directories are leftovers of runs with other inputs,
    removed only when nobody uses them: their owner process is gone (or, on another host, its record
    is a week old); the directory of a run that is still alive is left alone, so two stage runs
    with different inputs never delete each other's work."""
    base = local(root)
    check_relative(key, "work key")
    owners = _owners(base)
    owners.mkdir(parents=True, exist_ok=True)
    write_json(owners / f"{key}.json", _owner_record())       # before the directory: never unowned
    base.mkdir(parents=True, exist_ok=True)
    for old in list(base.iterdir()):
        if old.name == key or old.name.startswith("."):
            continue
        record = owners / f"{old.name}.json"
        if _owner_alive(record):
            continue
        _remove(old)
        record.unlink(missing_ok=True)
    for record in owners.glob("*.json"):         # records of directories that are gone
        k = record.name[: -len(".json")]
        if k != key and not (base / k).exists() and not _owner_alive(record):
            record.unlink(missing_ok=True)
    (base / key).mkdir(parents=True, exist_ok=True)
    return base / key


def release_work_dir(root: str | os.PathLike, key: str) -> None:
    """Remove ``root/key`` and its owner record (a finished job)."""
    base = local(root)
    shutil.rmtree(base / key, ignore_errors=True)
    (_owners(base) / f"{key}.json").unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        _owners(base).rmdir()         # only when empty
