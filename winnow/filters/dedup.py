"""Duplicate removal across the whole pool.

``dedup_exact`` reads a hex digest column (DataComp's ``sha256``). A null (or empty) digest means
the image's bytes are unknown (never downloaded): such a sample is treated as unique — it is never
a duplicate of anything and never makes another sample one — and counted in the step's state
(``null_hashes``); the image checks decide on it. A non-null value that is not a hex digest (at
least 16 hex characters), or a column that is not strings, fails with ShardError naming the shard,
the column and the count.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from winnow.filters.base import Step, register
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
    """A dedup step's fitted value: the rows to drop (shard -> row indices) and counts for the funnel."""
    rows: dict
    counts: dict


class _DropsRows(Step):
    """A global dedup step: ``fit`` returns Drops; ``verdict`` applies them."""

    def verdict(self, batch, fitted: Drops | None = None) -> np.ndarray:
        return ~np.isin(batch.positions(), fitted.rows.get(batch.shard, []))

    def report(self, fitted: Drops | None) -> dict:
        return fitted.counts if fitted else {}


@register
class DedupExact(_DropsRows):
    """Keep the first survivor (pool order) of each group of byte-identical images (``sha256``)."""
    kind = "dedup_exact"
    column: str = "sha256"
    is_global = True

    def requires(self):
        return [self.column], []

    def fit(self, pool, alive) -> Drops:
        keys, owners = [], []
        nulls = 0
        for k, shard in enumerate(pool.shards):
            # the first 64 bits of the hex digest identify an image among billions; ints sort fast
            h, null = digest_keys(pool.batch(shard).arrow(self.column), shard, self.column)
            rows = np.flatnonzero(alive(shard))
            nulls += int(null[rows].sum())
            rows = rows[~null[rows]]                 # an unknown digest is unique: never grouped
            keys.append(h[rows])
            owners.append(np.stack([np.full(len(rows), k), rows], axis=1))
        keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        owners = np.concatenate(owners) if owners else np.zeros((0, 2), int)
        order = np.lexsort((owners[:, 1], owners[:, 0], keys))   # by digest, then pool order
        first = np.ones(len(order), bool)
        first[1:] = keys[order][1:] != keys[order][:-1]
        dup = owners[order][~first]
        return Drops({pool.shards[k]: dup[dup[:, 0] == k, 1] for k in np.unique(dup[:, 0])},
                     {"unique_images": int(first.sum()), "duplicates": int(len(dup)), "null_hashes": nulls})


@register
class DedupNear(_DropsRows):
    """Keep the first survivor (pool order) of each group of near-identical images: a sample is a
    near duplicate when the cosine of its image embedding (``embedding``) with an earlier kept
    sample's is at least ``threshold`` (re-encodes, resizes, small crops of the same picture).

    Earlier kept samples are held as a float16 matrix of unique images, searched in blocks, so
    memory is (unique images x dim x 2 bytes) — 1.5 GB per million 768-d images; past DataComp
    small, cluster first (``image_clusters``) or run per partition.
    """
    kind = "dedup_near"
    embedding: str = "scorer_img"
    threshold: float = Field(0.95, gt=0, le=1)
    block: int = Field(4096, ge=1)
    is_global = True

    def requires(self):
        return [], [self.embedding]

    def fit(self, pool, alive) -> Drops:
        kept = np.zeros((0, 0), np.float16)
        drops = {}
        for shard in pool.shards:
            rows = np.flatnonzero(alive(shard))
            e = pool.batch(shard).embedding(self.embedding)[rows]
            if kept.size and e.ndim == 2 and e.shape[1] != kept.shape[1]:
                raise ShardError(f"shard {shard}: embedding '{self.embedding}' has width {e.shape[1]}, "
                                 f"earlier shards {kept.shape[1]}")
            ok = np.isfinite(e).all(axis=1)          # quarantined images (NaN) are never duplicates
            e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
            drop = []
            for i in range(0, len(rows), self.block):
                chunk = e[i: i + self.block]
                dup = np.zeros(len(chunk), bool)
                if kept.size:
                    for j in range(0, len(kept), self.block):   # against everything kept before
                        dup |= (chunk @ kept[j: j + self.block].astype(np.float32).T >= self.threshold).any(1)
                sims = chunk @ chunk.T                           # within the chunk: any earlier row counts
                dup |= np.triu(sims >= self.threshold, k=1).T.any(1)
                dup &= ok[i: i + self.block]
                fresh = ~dup & ok[i: i + self.block]
                kept = chunk[fresh].astype(np.float16) if not kept.size else np.concatenate([kept, chunk[fresh].astype(np.float16)])
                drop.append(rows[i: i + self.block][dup])
            if drop and (d := np.concatenate(drop)).size:
                drops[shard] = d
        return Drops(drops, {"unique_images": int(len(kept)), "near_duplicates": int(sum(len(v) for v in drops.values()))})
