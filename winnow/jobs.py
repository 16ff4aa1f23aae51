"""Resumable jobs: the one way winnow runs long work so that a killed run resumes, and a changed
input never brings old results back.

- A :class:`Job` is a list of units (shards, passes over shards, tasks, a training run), a map over
  them and an optional reduce. The map runs on an :class:`~winnow.executor.Executor`.
- A :class:`Key` covers everything a job's results depend on: the content of every input
  (hashes of small files; sizes and mtimes of large ones; sizes and ETags of S3 objects), the code
  the job runs (the source of its modules' import closure) and every parameter it reads.
- A :class:`WorkDir` is the job's directory for that key (``<root>/<job>/<key>``). It holds the
  units' outputs and, per unit, one completion marker that is also its stats record
  (``_done/<unit>.json``), written last. A re-run with the same key skips marked units; a run with
  another key starts clean, and the old key's leftovers are removed (winnow.io.keyed_work_dir).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm import tqdm

from winnow import io as wio
from winnow.config import ROOT
from winnow.executor import SERIAL, Executor

SMALL_FILE = 1 << 20   # inputs up to this size are identified by their bytes, larger ones by size + mtime
WORK_ROOT = ".winnow/work"

BOOT_ID, UNIT_DURABLE = wio.BOOT_ID, wio.UNIT_DURABLE


def _identity(path: Path) -> list:
    st = path.stat()
    if st.st_size <= SMALL_FILE:
        return [st.st_size, wio.file_sha256(path)]
    return [st.st_size, st.st_mtime_ns]


def content_identity(uri: str | os.PathLike, ignore: Callable[[str], bool] | None = None) -> Any:
    """What changes when a file's or a directory's content does (a directory: every file under it,
    by relative path; temp files of writers, and names ``ignore`` accepts, excluded). A missing
    input is identified as missing."""
    if wio.is_remote(uri):
        from winnow import s3

        listing = s3.list_objects(str(uri).rstrip("/"))
        if listing:
            return sorted([k, size, etag] for k, (size, etag) in listing.items())
        return ["object", s3.list_objects(str(uri).rsplit("/", 1)[0], recursive=False).get(str(uri).rsplit("/", 1)[1])]
    p = wio.local(uri)
    if p.is_file():
        return _identity(p)
    if p.is_dir():
        return sorted([f.relative_to(p).as_posix(), *_identity(f)] for f in _files(p)
                      if f.is_file() and not wio.is_temp_name(f.name) and not (ignore and ignore(f.name)))
    return None


def _files(root: Path) -> Iterator[Path]:
    """Every file under ``root``, through symlinked folders too (a download whose ``shards/`` links
    to another disk; ``Path.rglob`` does not enter them), each real folder once (no link cycles)."""
    seen = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders.sort()      # the same walk on every machine: which path reaches a folder first is fixed
        yield from (Path(folder) / n for n in names)


def code_identity(*modules: str) -> str:
    """A hash of the source of ``modules`` and every winnow module they import (statically)."""
    from winnow.imports import import_closure

    h = hashlib.sha256()
    for f in sorted({f for m in modules for f in import_closure(m)}):
        h.update(f.encode() + b"\0" + (ROOT / f).read_bytes() + b"\0")
    return h.hexdigest()


def digest(value: Any, n: int = 20) -> str:
    """A short hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:n]


class Key:
    """What a job's results depend on, built up part by part; ``digest()`` names its work directory."""

    def __init__(self, job: str):
        self.job = job
        self.parts: dict[str, Any] = {}

    def params(self, **values) -> "Key":
        """Parameters, as JSON (pydantic models are dumped)."""
        for k, v in values.items():
            self.parts[f"param:{k}"] = v.model_dump(mode="json") if hasattr(v, "model_dump") else v
        return self

    def files(self, **uris) -> "Key":
        """Input files or directories, by content identity (None: an input this run does not have)."""
        for k, u in uris.items():
            self.parts[f"file:{k}"] = None if u is None else (
                [content_identity(x) for x in u] if isinstance(u, (list, tuple)) else content_identity(u))
        return self

    def code(self, *modules: str) -> "Key":
        self.parts["code"] = code_identity(*modules)
        return self

    def digest(self) -> str:
        return digest([self.job, self.parts])


class WorkDir:
    """A job's work directory for one key: unit outputs plus one marker (= stats record) per unit."""

    def __init__(self, job: str, key: Key | str, root: str | os.PathLike = WORK_ROOT, unsynced: bool = False):
        """``unsynced``: the job writes its unit files and markers without fsync (``UNIT_DURABLE``);
        such a directory is discarded when it was written before the last boot."""
        self.job = job
        self.durable = not unsynced or UNIT_DURABLE
        self.key = key.digest() if isinstance(key, Key) else key
        self.root = Path(root) / job
        self.path = wio.keyed_work_dir(self.root, self.key)     # other keys' leftovers go
        boot = self.path / "_boot"
        if not self.durable and (not boot.exists() or boot.read_text() != BOOT_ID):   # from before a reboot
            for old in list(self.path.iterdir()):
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
            with wio.atomic_file(boot) as tmp:
                tmp.write_text(BOOT_ID)
        if isinstance(key, Key):   # which inputs made this key: a re-run that does not resume can be explained
            wio.write_json(self.path / "_key.json", {k: digest(v, 12) for k, v in key.parts.items()})

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def _marker(self, unit: str) -> Path:
        wio.check_relative(unit, "unit name")
        return self.path / "_done" / f"{unit}.json"

    def done(self, unit: str, unit_key: str | None = None) -> dict | None:
        """The unit's stats if it is complete (under ``unit_key``, when the unit has its own key)."""
        try:
            m = json.loads(self._marker(unit).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return m["stats"] if m.get("key") == unit_key else None

    def mark(self, unit: str, stats: dict, unit_key: str | None = None) -> None:
        """Record the unit complete: called after its outputs are written, so a marker means they are."""
        wio.write_json(self._marker(unit), {"key": unit_key, "stats": stats}, durable=self.durable)

    def finished(self) -> dict[str, dict]:
        d = self.path / "_done"
        return {p.stem: json.loads(p.read_text())["stats"] for p in d.glob("*.json")} if d.is_dir() else {}

    def release(self) -> None:
        """The job's results are out: remove the directory."""
        wio.release_work_dir(self.root, self.key)


@dataclass
class Job:
    """``map(unit) -> stats`` over ``units`` (a picklable callable: it runs on the executor's
    workers); ``reduce`` gets ``(unit, stats)`` pairs in unit order. With a work directory, ``map``
    writes its outputs there and returns JSON stats, recorded by the marker; ``unit_keys`` gives a
    unit a key of its own (an evaluation task's data)."""
    name: str
    units: list[str]
    map: Callable[[str], Any]
    reduce: Callable[[Iterator[tuple[str, Any]]], Any] | None = None
    unit_keys: dict[str, str] = field(default_factory=dict)


def run(job: Job, executor: Executor = SERIAL, work: WorkDir | None = None, progress: bool = True) -> Any:
    """Run the job's unfinished units, streaming results to ``reduce`` in unit order (or returning
    the stats list). Without ``work`` nothing is recorded: a map-reduce whose parts are cheap to
    recompute."""
    done = {u: s for u in job.units if work and (s := work.done(u, job.unit_keys.get(u))) is not None}
    todo = [u for u in job.units if u not in done]
    bar = tqdm(total=len(job.units), initial=len(done), desc=job.name, unit="unit", disable=not progress)

    def ordered() -> Iterator[tuple[str, Any]]:
        fresh = executor.map(job.map, [(u,) for u in todo], name=job.name)
        for u in job.units:
            if u in done:
                yield u, done[u]
                continue
            stats = next(fresh)
            if work:
                work.mark(u, stats, job.unit_keys.get(u))
            bar.update(1)
            yield u, stats

    try:
        if job.reduce:
            return job.reduce(ordered())
        return [s for _, s in ordered()]
    finally:
        bar.close()
