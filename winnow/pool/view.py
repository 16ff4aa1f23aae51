"""A read view of a pool (+ the embed stage's outputs) one shard at a time.

``Pool.open(dir)`` reads ``manifest.json``: the demo pool lives in that directory; an external
DataComp pool is referenced by ``uri`` and nothing is copied.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from winnow.io import local, read_json
from winnow.pool import shards


@dataclass
class Pool:
    uri: str                      # where the shards are
    shards: list[str]
    manifest: dict
    embed_uri: str | None = None  # the embed stage's per-shard outputs, when available

    @classmethod
    def open(cls, pool_dir: str, embed_uri: str | None = None) -> "Pool":
        manifest = read_json(local(pool_dir) / "manifest.json")
        uri = manifest.get("uri", ".")
        uri = str(local(pool_dir)) if uri == "." else uri
        return cls(uri=uri, shards=manifest.get("shards") or shards.discover(uri), manifest=manifest,
                   embed_uri=embed_uri)

    @property
    def truth_path(self) -> Path | None:
        p = local(self.uri) / "truth.parquet"
        return p if p.exists() else None

    def targets(self) -> dict[str, np.ndarray]:
        """Downstream-task embeddings written by the embed stage (``img:<task>``, ``txt:<task>``)."""
        p = local(self.embed_uri or "") / "targets.npz"
        if not self.embed_uri or not p.exists():
            return {}
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k].astype(np.float32) for k in z.files}

    def batch(self, shard: str) -> "ShardBatch":
        return ShardBatch(self, shard)


@dataclass
class ShardBatch:
    """One shard's metadata, scores and embeddings; columns load on first use."""
    pool: Pool
    shard: str
    _meta: pa.Table | None = None
    _extra: pa.Table | None = None
    _emb: dict = field(default_factory=dict)

    @property
    def meta(self) -> pa.Table:
        if self._meta is None:
            self._meta = shards.read_meta(self.pool.uri, self.shard)
        return self._meta

    @property
    def extra(self) -> pa.Table | None:
        """Columns the embed stage computed (scorer scores), row-aligned with ``meta``."""
        if self._extra is None and self.pool.embed_uri:
            p = local(self.pool.embed_uri) / f"{self.shard}.parquet"
            self._extra = pq.read_table(p) if p.exists() else None
        return self._extra

    def __len__(self) -> int:
        return self.meta.num_rows

    def columns(self) -> list[str]:
        return list(self.meta.column_names) + (list(self.extra.column_names) if self.extra is not None else [])

    def column(self, name: str) -> np.ndarray:
        if name in self.meta.column_names:
            return self.meta[name].to_numpy(zero_copy_only=False)
        if self.extra is not None and name in self.extra.column_names:
            return self.extra[name].to_numpy(zero_copy_only=False)
        raise KeyError(f"shard {self.shard}: no column '{name}' (available: {', '.join(self.columns())})")

    def embedding(self, key: str) -> np.ndarray:
        if key not in self._emb:
            sources = [self.pool.uri] + ([self.pool.embed_uri] if self.pool.embed_uri else [])
            for src in sources:
                p = shards.path(src, self.shard, "npz")
                if p.exists():
                    try:
                        with np.load(p, allow_pickle=False) as z:
                            if key in z.files:
                                self._emb[key] = z[key].astype(np.float32)
                                break
                    except Exception as exc:   # zip/npy corruption surfaces as many types
                        raise shards.ShardError(f"shard {self.shard}: cannot read {p}: {type(exc).__name__}: {exc}") from None
            else:
                raise KeyError(f"shard {self.shard}: no embedding '{key}' (available: {', '.join(self.embedding_keys())})")
        return self._emb[key]

    def embedding_keys(self) -> list[str]:
        keys = []
        for src in [self.pool.uri] + ([self.pool.embed_uri] if self.pool.embed_uri else []):
            p = shards.path(src, self.shard, "npz")
            if p.exists():
                try:
                    with np.load(p, allow_pickle=False) as z:
                        keys += list(z.files)
                except Exception as exc:
                    raise shards.ShardError(f"shard {self.shard}: cannot read {p}: {type(exc).__name__}: {exc}") from None
        return keys
