"""Duplicate removal across the whole pool.

``dedup_exact`` reads a hex digest column (DataComp's ``sha256``). A null (or empty) digest means
the image's bytes are unknown (never downloaded): such a sample is treated as unique — it is never
a duplicate of anything and never makes another sample one — and counted in the step's state
(``null_hashes``); the image checks decide on it. A non-null value that is not a hex digest (at
least 16 hex characters), or a column that is not strings, fails with ShardError naming the shard,
the column and the count.

Both steps hold only bounded state. ``dedup_exact`` hash-partitions the survivors' digest keys into
files in the run's scratch and deduplicates one partition at a time; ``dedup_near`` holds the kept
embeddings while they fit ``max_memory_mb`` and otherwise partitions the survivors by k-means
cluster. The rows to drop go to one file per shard in the scratch: the fitted value, pickled to
every worker for every shard, is a directory and counts, and a worker reads only its shard's rows.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from winnow.filters.alignment import SurvivorSample, _assign, _kmeans
from winnow.filters.base import Step, register
from winnow.io import atomic_file
from winnow.jobs import digest
from winnow.pool import uids as U
from winnow.pool.shards import ShardError


def digest_keys(values: pa.Array | pa.ChunkedArray, shard: str, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(the first 64 bits of each hex digest as uint64, mask of null/empty digests) of one shard's
    digest column. Raises ShardError for a non-string column or malformed digests."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], pa.string())
    if pa.types.is_null(values.type):
        return np.zeros(len(values), np.uint64), np.ones(len(values), bool)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise ShardError(f"shard {shard}: column '{column}' is {values.type}, not hex digest strings")
    null = np.asarray(pc.or_kleene(pc.is_null(values), pc.equal(values, "")).fill_null(True), bool)
    ok = np.asarray(pc.match_substring_regex(values, r"^[0-9a-fA-F]{16}").fill_null(False), bool)
    bad = ~null & ~ok
    if bad.any():
        examples = values.filter(pa.array(bad)).slice(0, 3).to_pylist()
        raise ShardError(f"shard {shard}: column '{column}' has {int(bad.sum())} value(s) that are not hex digests "
                         f"(at least 16 hex characters), e.g. {examples}")
    keys = np.zeros(len(values), np.uint64)
    if ok.any():
        head = pc.utf8_slice_codeunits(values.filter(pa.array(ok)), 0, 16)
        padded = np.char.add(np.asarray(head.to_numpy(zero_copy_only=False), dtype="U16"), "0" * 16)
        keys[ok] = U.hex_to_array(padded, sort=False)["f0"]
    return keys, null


@dataclass
class Drops:
    """A dedup step's fitted value: the rows to drop and counts for the funnel. The value is pickled
    to every worker for every shard, so the rows live in one ``<shard>.npy`` per shard in ``where``
    (a directory in the run's scratch); a fit without scratch (outside the engine, where nothing
    is pickled) holds them in ``rows`` (shard -> row indices) instead."""
    where: str | None
    counts: dict
    rows: dict = field(default_factory=dict)

    def of(self, shard: str) -> np.ndarray:
        """The shard's rows to drop, sorted."""
        if self.where is None:
            return self.rows.get(shard, np.zeros(0, np.int64))
        path = Path(self.where) / f"{shard}.npy"
        return np.load(path, allow_pickle=False) if path.exists() else np.zeros(0, np.int64)


class _Spill:
    """A fit's working files: append-only raw files (partitions, each shard's drop rows as they are
    found) in ``parts/``, and the per-shard drop files the fitted value points at. Under the step's
    own fit directory (``pool.fit_dir``: the engine gives one per step label, so two equal steps
    never share it; else the run's scratch) the directory is named by the step's parameters and
    removed first, so a fit re-run after a kill never reads a killed fit's partial files; without
    either it is a temporary directory, removed on exit. ``parts/`` is removed on exit either way."""

    def __init__(self, pool, step: Step):
        base = pool.fit_dir or pool.scratch   # the engine gives each step label its own fit_dir
        if base:
            self.root = Path(base) / f"{step.kind}-{digest(step.model_dump(mode='json'), 12)}"
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            self.root = Path(tempfile.mkdtemp(prefix=f"winnow-{step.kind}-"))
        self.temporary = not base
        self.parts = self.root / "parts"
        self.parts.mkdir(parents=True)

    def __enter__(self) -> "_Spill":
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.root if self.temporary else self.parts, ignore_errors=True)

    def append(self, name: str, values: np.ndarray) -> None:
        if len(values):
            with open(self.parts / name, "ab") as fh:
                fh.write(np.ascontiguousarray(values).tobytes())

    def read(self, name: str, dtype, mapped: bool = False) -> np.ndarray:
        """A part as a flat array (memory-mapped: read block by block as it is used); empty if never appended."""
        path = self.parts / name
        if not path.exists():
            return np.zeros(0, dtype)
        return np.memmap(path, dtype, mode="r") if mapped else np.fromfile(path, dtype)

    def drop(self, shard: str, rows: np.ndarray) -> None:
        self.append(f"drops-{shard}", rows.astype(np.int64))

    def drops(self, shards: list[str], counts: dict) -> Drops:
        """The fitted value: each shard's drop rows, sorted, saved (atomically) as ``<shard>.npy``."""
        found = {s: np.sort(r) for s in shards if len(r := self.read(f"drops-{s}", np.int64))}
        if self.temporary:
            return Drops(None, counts, found)
        for shard, rows in found.items():
            with atomic_file(self.root / f"{shard}.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, rows, allow_pickle=False)
        return Drops(str(self.root), counts)


def _split(labels: np.ndarray, values: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(label, its values in their original order) for each label present, in label order."""
    order = np.argsort(labels, kind="stable")
    for idx in np.split(order, np.flatnonzero(np.diff(labels[order])) + 1):
        if len(idx):
            yield int(labels[idx[0]]), values[idx]


class _DropsRows(Step):
    """A global dedup step: ``fit`` returns Drops; ``verdict`` applies them."""

    def verdict(self, batch, fitted: Drops | None = None) -> np.ndarray:
        return ~np.isin(batch.positions(), fitted.of(batch.shard))

    def report(self, fitted: Drops | None) -> dict:
        return fitted.counts if fitted else {}


def _survivors(pool, alive) -> int:
    """How many samples reached the step (the verdict files and parquet footers; no column is read)."""
    return sum(int(alive(shard).sum()) for shard in pool.shards)


# a partition record: the digest key and the sample's place in the pool
_RECORD = np.dtype([("key", "<u8"), ("shard", "<i4"), ("row", "<i4")])


@register
class DedupExact(_DropsRows):
    """Keep the first survivor (pool order) of each group of byte-identical images (``sha256``).

    One pass over the shards drops the later copies within each shard and appends the rest as
    (key, shard, row) records to one of P partition files chosen by the key's high bits; then each
    partition is sorted by key, then pool order, and all but the first of each key dropped. P is
    the power of two that puts at most ``partition_rows`` survivors in a partition (digests are
    uniform, so partitions are even, and an image copied in every shard adds one record per shard):
    the default, 16-byte records x 2M, holds a partition and its sort in about 100 MB at any pool size
    — 8 partitions at DataComp small.
    """
    kind = "dedup_exact"
    column: str = "sha256"
    partition_rows: int = Field(2_000_000, ge=1)
    is_global = True

    def requires(self):
        return [self.column], []

    def fit(self, pool, alive) -> Drops:
        bits = (max(1, math.ceil(_survivors(pool, alive) / self.partition_rows)) - 1).bit_length()
        nulls = duplicates = unique = 0
        with _Spill(pool, self) as spill:
            for k, shard in enumerate(pool.shards):
                # the first 64 bits of the hex digest identify an image among billions; ints sort fast
                h, null = digest_keys(pool.batch(shard).arrow(self.column), shard, self.column)
                rows = np.flatnonzero(alive(shard))
                nulls += int(null[rows].sum())
                rows = rows[~null[rows]]                 # an unknown digest is unique: never grouped
                first = np.zeros(len(rows), bool)
                first[np.unique(h[rows], return_index=True)[1]] = True   # a later copy in the shard is never first
                spill.drop(shard, rows[~first])
                duplicates += int((~first).sum())
                rec = np.empty(int(first.sum()), _RECORD)
                rec["key"], rec["shard"], rec["row"] = h[rows[first]], k, rows[first]
                part = rec["key"] >> np.uint64(64 - bits) if bits else np.zeros(len(rec), np.uint64)
                for p, records in _split(part, rec):
                    spill.append(f"part-{p}", records)
            for p in range(1 << bits):
                rec = spill.read(f"part-{p}", _RECORD)
                rec = rec[np.lexsort((rec["shard"], rec["key"]))]   # by digest, then pool order (a key is once a shard)
                first = np.ones(len(rec), bool)
                first[1:] = rec["key"][1:] != rec["key"][:-1]
                unique += int(first.sum())
                duplicates += int((~first).sum())
                for k, rows in _split(rec["shard"][~first], rec["row"][~first]):
                    spill.drop(pool.shards[k], rows)
            return spill.drops(pool.shards, {"unique_images": unique, "duplicates": duplicates, "null_hashes": nulls})


class _Greedy:
    """The near-duplicate rule over blocks of unit embeddings met in pool order: a row is a near
    duplicate when its cosine with a row kept before it (in an earlier block, or earlier in its
    own) is at least ``threshold``; the other finite rows are kept (float16, searched in blocks).
    Only kept rows count, so the kept set is the same for any block size and shard split: in a
    chain A ~ B ~ C with A and C apart, B goes and C stays."""

    def __init__(self, threshold: float, block: int):
        self.threshold, self.block = threshold, block
        self.kept = np.zeros((0, 0), np.float16)

    def duplicates(self, chunk: np.ndarray, ok: np.ndarray) -> np.ndarray:
        """The near duplicates among ``chunk`` (float32 unit rows, at most ``block``; ``ok``: finite rows)."""
        dup = np.zeros(len(chunk), bool)
        if self.kept.size:
            for j in range(0, len(self.kept), self.block):   # against everything kept before
                dup |= (chunk @ self.kept[j: j + self.block].astype(np.float32).T >= self.threshold).any(1)
        dup &= ok
        # close[i, j], i < j: row j against row i as it would be kept (float16), as across blocks
        close = np.tril(chunk @ chunk.astype(np.float16).astype(np.float32).T >= self.threshold, k=-1).T
        for i in np.flatnonzero(close.any(1)):                     # within the chunk, in order: a row
            if ok[i] and not dup[i]:                               # that stays drops the later ones near it
                dup |= close[i] & ok
        fresh = chunk[~dup & ok].astype(np.float16)
        self.kept = fresh if not self.kept.size else np.concatenate([self.kept, fresh])
        return dup


@register
class DedupNear(_DropsRows):
    """Keep the first survivor (pool order) of each group of near-identical images: a sample is a
    near duplicate when the cosine of its image embedding (``embedding``) with an earlier kept
    sample's is at least ``threshold`` (re-encodes, resizes, small crops of the same picture).

    Earlier kept samples are held as a float16 matrix, searched in blocks: unique images x dim x 2
    bytes, 1.5 GB per million 768-d images. While the survivors' embeddings fit ``max_memory_mb``
    that is the whole method. Past it (or with ``partitions`` set) the survivors are partitioned:
    k-means (``partitions`` clusters, else enough that a cluster 4x the mean size fits) over an
    even sample of ``sample`` survivors, each survivor's (shard, row, float16 unit embedding)
    spilled to its nearest cluster's file in the scratch, and the same rule run within each
    cluster in pool order. Partitioned, a pair of near duplicates that lands in two clusters is not
    found: a pair straddling a cluster boundary keeps both samples.
    """
    kind = "dedup_near"
    embedding: str = "scorer_img"
    threshold: float = Field(0.95, gt=0, le=1)
    block: int = Field(4096, ge=1)
    max_memory_mb: float = Field(512, gt=0)
    partitions: int | None = Field(None, ge=1)
    sample: int = Field(100_000, ge=1)
    seed: int = 0
    is_global = True

    def requires(self):
        return [], [self.embedding]

    def fit(self, pool, alive) -> Drops:
        size = _survivors(pool, alive) * pool.batch(pool.shards[0]).embedding(self.embedding).shape[1] * 2
        with _Spill(pool, self) as spill:
            if self.partitions is None and size <= self.max_memory_mb * 2**20:
                counts = self._fit_whole(pool, alive, spill)
            else:
                clusters = self.partitions or math.ceil(4 * size / (self.max_memory_mb * 2**20))
                counts = self._fit_partitioned(pool, alive, spill, clusters)
            return spill.drops(pool.shards, counts)

    def _fit_whole(self, pool, alive, spill: _Spill) -> dict:
        greedy, dropped = _Greedy(self.threshold, self.block), 0
        for shard in pool.shards:
            rows = np.flatnonzero(alive(shard))
            e = pool.batch(shard).embedding(self.embedding)[rows]
            if greedy.kept.size and e.ndim == 2 and e.shape[1] != greedy.kept.shape[1]:
                raise ShardError(f"shard {shard}: embedding '{self.embedding}' has width {e.shape[1]}, "
                                 f"earlier shards {greedy.kept.shape[1]}")
            ok = np.isfinite(e).all(axis=1)          # quarantined images (NaN) are never duplicates
            e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
            for i in range(0, len(rows), self.block):
                dup = greedy.duplicates(e[i: i + self.block], ok[i: i + self.block])
                spill.drop(shard, rows[i: i + self.block][dup])
                dropped += int(dup.sum())
        return {"unique_images": int(len(greedy.kept)), "near_duplicates": dropped}

    def _fit_partitioned(self, pool, alive, spill: _Spill, clusters: int) -> dict:
        sample = SurvivorSample(self.embedding, self.sample, self.seed)
        for p in range(2):
            x = sample.reduce((sample.part(pool.batch(s), alive(s), p) for s in pool.shards), p)
        centroids = _kmeans(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), clusters, self.seed)
        for k, shard in enumerate(pool.shards):
            rows = np.flatnonzero(alive(shard))
            e = pool.batch(shard).embedding(self.embedding)[rows]
            near = _assign(e, centroids, shard, self.embedding)     # -1: not finite (never a duplicate)
            e = (e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)).astype(np.float16)
            for c, idx in _split(near, np.arange(len(rows))):
                if c >= 0:
                    spill.append(f"rows-{c}", np.stack([np.full(len(idx), k), rows[idx]], axis=1))
                    spill.append(f"emb-{c}", e[idx])
        unique = dropped = 0
        for c in range(0 if centroids is None else len(centroids)):
            where = spill.read(f"rows-{c}", np.int64).reshape(-1, 2)
            emb = spill.read(f"emb-{c}", np.float16, mapped=True).reshape(len(where), centroids.shape[1])
            greedy = _Greedy(self.threshold, self.block)
            dup = np.zeros(len(where), bool)
            for i in range(0, len(where), self.block):
                chunk = emb[i: i + self.block].astype(np.float32)
                dup[i: i + self.block] = greedy.duplicates(chunk, np.ones(len(chunk), bool))
            unique += len(greedy.kept)
            dropped += int(dup.sum())
            for k, rows in _split(where[dup, 0], where[dup, 1]):
                spill.drop(pool.shards[k], rows)
        return {"unique_images": unique, "near_duplicates": dropped}
