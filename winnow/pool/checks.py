"""The pool gate: is this a well-formed DataComp pool? One shard is read at a time.

Frames checked with Great Expectations:
- ``shards`` (one row per shard): parquet columns complete, parquet/npz rows agree, tar readable,
  shard not empty;
- ``samples`` (one row per sample, light columns only): uid present, 32 hex and unique across
  the pool, sizes positive, similarity scores in [-1, 1], embeddings finite, image present.

In DataComp's download layout the shards are the metadata files; whether a sample's image
downloaded comes from img2dataset's records, and link rot is normal: the gate asks only that
``min_downloaded`` of the rows have an image (failed rows are not errors). ``images`` (one row per
img2dataset shard) checks that each recorded shard has its tar. Tars are read by embed and reshard,
which quarantine what they cannot read, not here (a real pool's tars are hundreds of GB).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from winnow import io as wio
from winnow.pool import shards
from winnow.pool.view import Pool
from winnow.validate import Gate, expect

LIGHT = ["uid", "original_width", "original_height", "clip_b32_similarity_score", "clip_l14_similarity_score"]


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
    shard_rows, frames = [], []
    for shard in pool.shards:
        r, df = inspect_shard(pool, shard)
        shard_rows.append(r)
        frames.append(df)
    shards_df = pd.DataFrame(shard_rows)
    samples = pd.concat(frames, ignore_index=True)
    gate.check("shards", shards_df, [
        E.ExpectColumnValuesToBeInSet(column="missing_columns", value_set=[""]),
        E.ExpectColumnValuesToBeBetween(column="parquet_rows", min_value=1),
        E.ExpectColumnPairValuesToBeEqual(column_A="parquet_rows", column_B="npz_rows"),
        E.ExpectColumnValuesToBeInSet(column="tar_readable", value_set=[True], mostly=1.0 - max_unreadable_tars),
    ], id_column=["shard", "tar_error"])
    rules = [
        E.ExpectColumnValuesToNotBeNull(column="uid"),
        E.ExpectColumnValuesToMatchRegex(column="uid", regex=r"^[0-9a-f]{32}$"),
        E.ExpectColumnValuesToBeUnique(column="uid"),
        E.ExpectColumnValuesToBeInSet(column="embeddings_finite", value_set=[True]),
        E.ExpectColumnValuesToBeInSet(column="image_present", value_set=[True], mostly=min_image_fraction),
    ]
    for c in ("original_width", "original_height"):
        if c in samples:
            rules.append(E.ExpectColumnValuesToBeBetween(column=c, min_value=1))
    for c in ("clip_b32_similarity_score", "clip_l14_similarity_score"):
        if c in samples:
            rules.append(E.ExpectColumnValuesToBeBetween(column=c, min_value=-1.0, max_value=1.0))
    if "uid" in samples:
        gate.check("samples", samples, rules)
    return {"shards": len(shard_rows), "samples": int(len(samples)),
            "images": int(shards_df["images"].sum()),
            "unreadable_tars": int((~shards_df["tar_readable"]).sum())}
