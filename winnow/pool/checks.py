"""The pool gate: is this a well-formed DataComp pool? One shard is read at a time.

Checked with Great Expectations, in bounded memory at any pool size:
- ``shards`` (one frame, one row per shard): parquet columns complete, parquet/npz rows agree, tar
  readable, shard not empty;
- ``samples`` (streamed, frames of whole shards up to ~262k rows, light columns only): uid present and 32 hex, sizes
  positive, similarity scores in [-1, 1], embeddings finite, image present;
- uids unique across the pool: each shard's uids (16-byte values) are spilled to hash partitions on
  disk, so every copy of a uid lands in one partition, and the partitions are streamed as frames
  (``UidSpill``): one partition in memory at a time, never a pool-wide set.

In DataComp's download layout the shards are the metadata files; whether a sample's image
downloaded comes from img2dataset's records, and link rot is normal: the gate asks only that
``min_downloaded`` of the rows have an image (failed rows are not errors). ``images`` (one row per
img2dataset shard) checks that each recorded shard has its tar. Tars are read by embed and reshard,
which quarantine what they cannot read, not here (a real pool's tars are hundreds of GB).
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from winnow import io as wio
from winnow.pool import shards
from winnow.pool import uids as U
from winnow.pool.view import Pool
from winnow.validate import Gate, expect

LIGHT = ["uid", "original_width", "original_height", "clip_b32_similarity_score", "clip_l14_similarity_score"]
SAMPLES = [*LIGHT, "shard", "embeddings_finite", "image_present"]   # every frame of the samples stream
PARTITIONS = 256        # uid hash partitions: one holds ~1/256 of the pool's uids
SPILL_AT = 1 << 20      # uids buffered before they are written to their partitions (20 MiB)
FRAME_ROWS = 1 << 18    # partitions are read back and checked in frames of about this many uids
_SPILLED = np.dtype([("f0", "u8"), ("f1", "u8"), ("shard", "u4")])
_HEX32 = re.compile(r"[0-9a-f]{32}")


class UidSpill:
    """The pool's uids as 128-bit values with their shard's number (20 bytes each), spilled to hash
    partitions in ``where``: every copy of a uid is in one partition, so uniqueness across the
    pool is uniqueness within each partition. Only uids that are 32 lowercase hex are spilled (the
    others fail the regex rule)."""

    def __init__(self, where: str, shard_names: list[str]):
        self.where, self.names = Path(where), np.asarray(shard_names)
        self.buffer: list[np.ndarray] = []
        self.buffered = 0

    def add(self, shard_index: int, uids: pd.Series) -> None:
        valid = np.fromiter((isinstance(u, str) and _HEX32.fullmatch(u) is not None for u in uids), bool, len(uids))
        arr = U.hex_to_array(uids[valid].to_numpy(dtype=object), sort=False)
        rec = np.empty(len(arr), _SPILLED)
        rec["f0"], rec["f1"], rec["shard"] = arr["f0"], arr["f1"], shard_index
        self.buffer.append(rec)
        self.buffered += len(rec)
        if self.buffered >= SPILL_AT:
            self.spill()

    def spill(self) -> None:
        rec = np.concatenate(self.buffer) if self.buffer else np.empty(0, _SPILLED)
        self.buffer, self.buffered = [], 0
        # a multiplicative hash of both halves, so uids that differ only in a few bits spread too
        part = (((rec["f0"] ^ rec["f1"]) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(56)).astype(np.intp)
        order = np.argsort(part, kind="stable")
        rec, bounds = rec[order], np.searchsorted(part[order], np.arange(PARTITIONS + 1))
        for p in np.flatnonzero(np.diff(bounds)):
            with open(self.where / f"{p:03d}.uids", "ab") as fh:
                rec[bounds[p]:bounds[p + 1]].tofile(fh)

    def frames(self) -> Iterator[pd.DataFrame]:
        """Whole partitions, a few at a time (about FRAME_ROWS uids), as frames of ``uid``, ``shard``."""
        self.spill()
        chunk, rows = [], 0
        for p in range(PARTITIONS):
            if (f := self.where / f"{p:03d}.uids").exists():
                chunk.append(np.fromfile(f, _SPILLED))
                rows += len(chunk[-1])
            if chunk and (rows >= FRAME_ROWS or p == PARTITIONS - 1):
                rec = np.concatenate(chunk)
                chunk, rows = [], 0
                yield pd.DataFrame({"uid": U.array_to_hex(rec), "shard": self.names[rec["shard"]]})


def inspect_shard(pool: Pool, shard: str) -> tuple[dict, pd.DataFrame]:
    row = {"shard": shard, "missing_columns": "", "parquet_rows": 0, "npz_rows": -1,
           "tar_readable": True, "tar_error": "", "images": 0}
    try:
        meta = shards.read_meta(pool.uri, shard)
    except shards.ShardError as exc:
        row["missing_columns"] = f"unreadable parquet: {exc}"
        return row, pd.DataFrame(columns=["uid", "shard"])
    row["missing_columns"] = ",".join(c for c in shards.META_COLUMNS if c not in meta.column_names)
    row["parquet_rows"] = meta.num_rows
    df = meta.select([c for c in LIGHT if c in meta.column_names]).to_pandas()
    df["shard"] = shard
    df["embeddings_finite"] = True
    if pool.is_download:
        df["image_present"] = pool.batch(shard).column("downloaded")
        row["images"] = int(df["image_present"].sum())
    npz = shards.path(pool.uri, shard, "npz")
    if wio.exists(npz):
        arrays = shards.read_npz(pool.uri, shard)
        rows = {k: len(v) for k, v in arrays.items()}
        row["npz_rows"] = min(rows.values()) if len(set(rows.values())) == 1 else -2
        if row["npz_rows"] == meta.num_rows:
            finite = np.ones(meta.num_rows, bool)
            for v in arrays.values():
                finite &= np.isfinite(v).all(axis=1) & (np.linalg.norm(v, axis=1) > 0)
            df["embeddings_finite"] = finite
    else:
        row["npz_rows"] = meta.num_rows   # embeddings are optional (the embed stage computes ours)
    if pool.is_download:
        return row, df
    present: set[str] = set()
    try:
        for s in shards.iter_tar(pool.uri, shard):
            if s.get("jpg"):
                present.add(s["json"].get("uid"))
    except shards.ShardError as exc:
        row["tar_readable"], row["tar_error"] = False, str(exc)
    row["images"] = len(present)
    df["image_present"] = df["uid"].isin(present) if "uid" in df else False
    return row, df


def check_images(pool: Pool, gate: Gate) -> None:
    """Download layout: every img2dataset shard with a record also has its tar."""
    rows = [{"image_shard": s, "tar_present": wio.exists(wio.join(pool.images_uri, f"{s}.tar"))}
            for s in pool.all_image_shards()]
    if rows:
        gate.check("images", pd.DataFrame(rows), [
            expect().ExpectColumnValuesToBeInSet(column="tar_present", value_set=[True])], id_column="image_shard")


def check_pool(pool: Pool, gate: Gate, min_image_fraction: float = 0.8, max_unreadable_tars: float = 0.0) -> dict:
    """The pool gate. A truncated or corrupt tar fails it unless the share of such shards is within
    ``max_unreadable_tars`` (then their images count as missing, and downstream stages quarantine them).
    ``min_image_fraction``: the share of samples that must have an image."""
    E = expect()
    if pool.is_download:
        check_images(pool, gate)
    shard_rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="winnow-uids-") as tmp:
        spill = UidSpill(tmp, pool.shards)

        def samples() -> Iterator[pd.DataFrame]:
            """Shards' sample frames, several joined up to about FRAME_ROWS rows: one GX validation
            costs ~80 ms whatever its size, so a frame per 10,000-row shard would make the gate
            GX-bound (1,280 validations at DataComp small)."""
            frames, rows = [], 0
            for i, shard in enumerate(pool.shards):
                r, df = inspect_shard(pool, shard)
                shard_rows.append(r)
                df = df.reindex(columns=SAMPLES)   # a column a shard lacks is null (missing_columns names it)
                spill.add(i, df["uid"])
                frames.append(df)
                rows += len(df)
                if rows >= FRAME_ROWS:
                    yield pd.concat(frames, ignore_index=True)
                    frames, rows = [], 0
            if frames:
                yield pd.concat(frames, ignore_index=True)

        rules = [
            E.ExpectColumnValuesToNotBeNull(column="uid"),
            E.ExpectColumnValuesToMatchRegex(column="uid", regex=r"^[0-9a-f]{32}$"),
            E.ExpectColumnValuesToBeInSet(column="embeddings_finite", value_set=[True]),
            E.ExpectColumnValuesToBeInSet(column="image_present", value_set=[True], mostly=min_image_fraction),
            *(E.ExpectColumnValuesToBeBetween(column=c, min_value=1) for c in ("original_width", "original_height")),
            *(E.ExpectColumnValuesToBeBetween(column=c, min_value=-1.0, max_value=1.0)
              for c in ("clip_b32_similarity_score", "clip_l14_similarity_score")),
        ]
        gate.check_stream("samples", samples(), rules, id_column=["uid", "shard"])
        gate.check_stream("samples", spill.frames(), [E.ExpectColumnValuesToBeUnique(column="uid")],
                          id_column=["uid", "shard"], partitioned_by="uid")
    shards_df = pd.DataFrame(shard_rows)
    gate.check("shards", shards_df, [
        E.ExpectColumnValuesToBeInSet(column="missing_columns", value_set=[""]),
        E.ExpectColumnValuesToBeBetween(column="parquet_rows", min_value=1),
        E.ExpectColumnPairValuesToBeEqual(column_A="parquet_rows", column_B="npz_rows"),
        E.ExpectColumnValuesToBeInSet(column="tar_readable", value_set=[True], mostly=1.0 - max_unreadable_tars),
    ], id_column=["shard", "tar_error"])
    return {"shards": len(shard_rows), "samples": int(shards_df["parquet_rows"].sum()),
            "images": int(shards_df["images"].sum()),
            "unreadable_tars": int((~shards_df["tar_readable"]).sum())}
