"""DataComp shard I/O: discovery and per-shard readers/writers for ``{n:08d}.tar/.parquet/.npz``.

A pool directory holds, per shard ``n``: ``{n:08d}.parquet`` (metadata), ``{n:08d}.npz`` (embeddings,
row i <-> parquet row i), ``{n:08d}.tar`` (webdataset images) and ``{n:08d}_stats.json``.
Embeddings may be float16 on disk; readers always return float32.
"""
from __future__ import annotations

import json
import re
import tarfile
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from winnow.errors import WinnowError
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


class ShardError(WinnowError, ValueError):
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
            out = {k: z[k].astype(np.float32) for k in wanted}
    except FileNotFoundError:
        raise ShardError(f"shard {shard}: embeddings {p} are missing") from None
    except ShardError:
        raise
    except Exception as exc:   # zip/npy corruption surfaces as many types (BadZipFile, EOFError, ValueError …)
        raise ShardError(f"shard {shard}: cannot read {p}: {type(exc).__name__}: {exc}") from None
    for k, v in out.items():
        check_embedding(v, shard, f"{p} '{k}'")
    return out


def check_embedding(v: np.ndarray, shard: str, label: str, width: int | None = None) -> None:
    """An embedding array is (rows, width): anything else is a ShardError naming it."""
    if v.ndim != 2 or (width is not None and v.shape[1] != width):
        want = f"(rows, {width})" if width else "(rows, width)"
        raise ShardError(f"shard {shard}: embedding {label} has shape {v.shape}, expected {want}")


def write_npz(uri: str, shard: str, arrays: dict[str, np.ndarray], dtype=np.float16) -> None:
    with atomic_file(path(uri, shard, "npz")) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **{k: np.asarray(v, dtype=dtype) for k, v in arrays.items()})


def _json(data: bytes | None) -> dict:
    """A sample's json member; one that is not a JSON object reads as {}, and a ``uid`` that is not
    text is left out (the sample has no uid, so readers count it, never crash on it)."""
    try:
        obj = json.loads(data) if data is not None else {}
    except (ValueError, RecursionError):   # JSONDecodeError, UnicodeDecodeError; nesting too deep
        return {}
    if not isinstance(obj, dict):
        return {}
    if not isinstance(obj.get("uid", ""), str):   # a list or object would reach set and dict lookups
        del obj["uid"]
    return obj


def _sample(members: dict) -> dict:
    ext = next((e for e in ("jpg", "jpeg", "png", "webp") if members.get(e)), "jpg")
    txt, bad_utf8 = members.get("txt"), False
    if txt is not None:
        try:
            txt = txt.decode("utf-8")
        except UnicodeDecodeError:      # kept, with U+FFFD for the bad bytes, and flagged for counting
            txt, bad_utf8 = txt.decode("utf-8", errors="replace"), True
    return {
        "__key__": members["__key__"],
        "jpg": members.get(ext),        # the image, whatever its format ...
        "ext": ext,                     # ... and the suffix it came with (img2dataset --encode_format)
        "txt": txt,
        "json": _json(members.get("json")),
        **({"txt_not_utf8": True} if bad_utf8 else {}),    # only then: a sample written back stays as read
    }


def iter_tar(uri: str, shard: str) -> Iterator[dict]:
    """Samples of one webdataset tar: ``{"__key__", "jpg": bytes, "ext": str, "txt": str, "json": dict}``
    (``jpg``: the image in whatever format, ``ext`` its member suffix), and ``"txt_not_utf8": True``
    where the caption's bytes were not UTF-8 (read with U+FFFD for them).

    Members are grouped by key (name up to the first dot) and read in memory, never extracted, so
    a member named ``../x`` or ``/x`` cannot write anywhere. Only allowlisted member types are read
    (images, txt, json, cls: ``winnow.decode.ALLOWED_SUFFIXES``), each at most
    ``decode.MAX_MEMBER_BYTES``; others are skipped unread. A truncated or corrupt tar raises
    ShardError naming the shard: tarfile itself ends quietly at a cut-off header, so the archive's
    end-of-file blocks are checked too. Every sample read whole before the cut is yielded first,
    the last one included (it ends where the cut-off member begins).
    """
    from winnow import decode

    p = path(uri, shard, "tar")
    if not wio.exists(p):
        raise ShardError(f"shard {shard}: images {p} are missing")
    end = 0
    current: dict = {}
    try:
        with wio.open_read(p) as raw:
            fh = _Tail(raw)
            with decode.open_tar_stream(fileobj=fh) as tf:   # stream mode: reads as it downloads
                for m in tf:
                    if not m.isreg():
                        continue
                    end = m.offset_data + -(-m.size // 512) * 512
                    key, ext = decode.member_suffix(m.name)
                    if not decode.allowed_member(m.name) or m.size > decode.MAX_MEMBER_BYTES:
                        continue    # never read: a pickle, or a member too large to hold (stream mode skips it)
                    if current and key != current["__key__"]:
                        yield _sample(current)     # whole: before this member is read, which may be cut off
                        current = {}
                    data = tf.extractfile(m).read()
                    if len(data) != m.size:
                        raise ShardError(f"shard {shard}: tar {p} is truncated inside member {m.name!r}")
                    current.setdefault("__key__", key)
                    current[ext] = data
                if current:
                    yield _sample(current)
                    current = {}
            fh.drain()
    except (tarfile.TarError, OSError, json.JSONDecodeError) as exc:
        if current:     # cut off at a header: the members read before it are whole
            yield _sample(current)
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
    """Decode untrusted image bytes to an RGB PIL image, its declared size checked before decoding
    (``winnow.decode.open_image``); raises ValueError (ImageError, ImageTooLarge) on a corrupt image
    or a decompression bomb, which callers quarantine."""
    from winnow.decode import open_image

    return open_image(data)
