"""DataComp shard I/O: discovery and per-shard readers/writers for ``{n:08d}.tar/.parquet/.npz``.

A pool directory holds, per shard ``n``: ``{n:08d}.parquet`` (metadata), ``{n:08d}.npz`` (embeddings,
row i <-> parquet row i), ``{n:08d}.tar`` (webdataset images) and ``{n:08d}_stats.json``.
Embeddings may be float16 on disk; readers always return float32.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from winnow import io as wio
from winnow.io import atomic_file, read_json, write_json

META_COLUMNS = [
    "uid", "url", "text", "original_width", "original_height",
    "clip_b32_similarity_score", "clip_l14_similarity_score", "face_bboxes", "sha256",
]
META_SCHEMA = pa.schema([
    ("uid", pa.string()), ("url", pa.string()), ("text", pa.string()),
    ("original_width", pa.int64()), ("original_height", pa.int64()),
    ("clip_b32_similarity_score", pa.float32()), ("clip_l14_similarity_score", pa.float32()),
    ("face_bboxes", pa.list_(pa.list_(pa.float64()))), ("sha256", pa.string()),
])
EMBED_DIMS = {"b32_img": 512, "b32_txt": 512, "l14_img": 768, "l14_txt": 768}
_STEM = re.compile(r"^\d{8}$")
FIXED_MTIME = 1_700_000_000.0   # reproducible tar bytes


class ShardError(ValueError):
    """A shard is missing, unreadable or inconsistent; the message names the shard."""


def stem(n: int) -> str:
    return f"{n:08d}"


def discover(uri: str) -> list[str]:
    """Shard stems (``00000000`` …) present in a pool directory or s3 prefix, sorted, found by their parquet."""
    try:
        names = wio.list_names(uri)
    except FileNotFoundError:
        raise ShardError(f"pool directory not found: {uri}") from None
    stems = sorted(n[: -len(".parquet")] for n in names if n.endswith(".parquet") and _STEM.match(n[: -len(".parquet")]))
    if not stems:
        raise ShardError(f"no {{n:08d}}.parquet shards in {uri}")
    return stems


def path(uri: str, shard: str, ext: str):
    """A shard file: a Path locally, an ``s3://`` string remotely."""
    return wio.join(uri, f"{shard}.{ext}" if ext != "stats" else f"{shard}_stats.json")


def read_meta(uri: str, shard: str, columns: list[str] | None = None) -> pa.Table:
    p = path(uri, shard, "parquet")
    try:
        return pq.read_table(wio.source(p), columns=columns)
    except FileNotFoundError:
        raise ShardError(f"shard {shard}: metadata {p} is missing") from None
    except (pa.ArrowInvalid, KeyError, OSError) as exc:
        raise ShardError(f"shard {shard}: cannot read {p}: {exc}") from None


def write_meta(uri: str, shard: str, table: pa.Table) -> None:
    with atomic_file(path(uri, shard, "parquet")) as tmp:
        pq.write_table(table, tmp)


def read_npz(uri: str, shard: str, keys: list[str] | None = None) -> dict[str, np.ndarray]:
    """Embedding arrays of one shard as float32 (float16 on disk is upcast: compute in float32)."""
    p = path(uri, shard, "npz")
    try:
        with np.load(wio.source(p), allow_pickle=False) as z:
            wanted = keys if keys is not None else list(z.files)
            missing = [k for k in wanted if k not in z.files]
            if missing:
                raise ShardError(f"shard {shard}: {p} lacks key(s) {missing} (has {z.files})")
            return {k: z[k].astype(np.float32) for k in wanted}
    except FileNotFoundError:
        raise ShardError(f"shard {shard}: embeddings {p} are missing") from None
    except (ValueError, OSError) as exc:
        raise ShardError(f"shard {shard}: cannot read {p}: {exc}") from None


def write_npz(uri: str, shard: str, arrays: dict[str, np.ndarray], dtype=np.float16) -> None:
    with atomic_file(path(uri, shard, "npz")) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **{k: np.asarray(v, dtype=dtype) for k, v in arrays.items()})


def _sample(members: dict) -> dict:
    return {
        "__key__": members["__key__"],
        "jpg": members.get("jpg") or members.get("jpeg") or members.get("png") or members.get("webp"),
        "txt": members["txt"].decode("utf-8", errors="replace") if "txt" in members else None,
        "json": json.loads(members["json"]) if "json" in members else {},
    }


def iter_tar(uri: str, shard: str) -> Iterator[dict]:
    """Samples of one webdataset tar: ``{"__key__", "jpg": bytes, "txt": str, "json": dict}``.

    Members are grouped by key (name up to the first dot) and read in memory, never extracted, so
    a member named ``../x`` or ``/x`` cannot write anywhere. A truncated or corrupt tar raises
    ShardError naming the shard: tarfile itself ends quietly at a cut-off header, so the archive's
    end-of-file blocks are checked too.
    """
    p = path(uri, shard, "tar")
    if not wio.exists(p):
        raise ShardError(f"shard {shard}: images {p} are missing")
    end = 0
    try:
        with wio.open_read(p) as raw:
            fh = _Tail(raw)
            with tarfile.open(fileobj=fh, mode="r|") as tf:   # stream mode: reads as it downloads
                current: dict = {}
                for m in tf:
                    if not m.isreg():
                        continue
                    data = tf.extractfile(m).read()
                    if len(data) != m.size:
                        raise ShardError(f"shard {shard}: tar {p} is truncated inside member {m.name!r}")
                    end = m.offset_data + -(-m.size // 512) * 512
                    folder, _, base = m.name.rpartition("/")
                    key, _, ext = base.partition(".")
                    key = f"{folder}/{key}" if folder else key
                    if current and key != current["__key__"]:
                        yield _sample(current)
                        current = {}
                    current.setdefault("__key__", key)
                    current[ext] = data
                if current:
                    yield _sample(current)
            fh.drain()
    except (tarfile.TarError, OSError, json.JSONDecodeError) as exc:
        raise ShardError(f"shard {shard}: tar {p} is unreadable: {type(exc).__name__}: {exc}") from None
    except Exception as exc:   # a network failure mid-stream (after boto3's retries): fail, naming the object
        if type(exc).__module__.split(".")[0] in ("botocore", "urllib3"):
            from winnow.s3 import S3Error

            raise S3Error(f"reading {p} failed: {type(exc).__name__}: {exc}") from None
        raise
    # a complete tar ends with at least two zero blocks after the last member
    if fh.size - end < 1024 or fh.last_nonzero >= end:
        raise ShardError(f"shard {shard}: tar {p} is truncated (no end-of-archive marker after byte {end})")


class _Tail:
    """A read-through wrapper that counts bytes and remembers the offset of the last non-zero byte,
    so the end-of-archive check needs no second read (or download) of the tar."""

    def __init__(self, raw):
        self.raw, self.size, self.last_nonzero = raw, 0, -1

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read() if n is None or n < 0 else self.raw.read(n)
        stripped = len(data.rstrip(b"\0"))
        if stripped:
            self.last_nonzero = self.size + stripped - 1
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def write_tar(uri: str, shard: str, samples: list[dict]) -> None:
    """Write samples (``__key__``, ``jpg`` bytes, ``txt`` str, ``json`` dict) and the stats file.
    A fixed mtime keeps the bytes identical for identical content."""
    import webdataset as wds

    with atomic_file(path(uri, shard, "tar")) as tmp:
        with wds.TarWriter(str(tmp), mtime=FIXED_MTIME) as sink:
            for s in samples:
                sink.write(s)
    write_json(path(uri, shard, "stats"), {"count": len(samples), "successes": len(samples),
                                           "failed_to_download": 0})


def read_stats(uri: str, shard: str) -> dict:
    return read_json(path(uri, shard, "stats"))


def decode_image(data: bytes):
    """Decode JPEG bytes to an RGB PIL image; raises ValueError on corrupt data."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except Exception as exc:
        raise ValueError(f"corrupt image: {exc}") from None
