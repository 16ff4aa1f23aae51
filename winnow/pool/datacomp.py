"""A pool as DataComp's ``download_upstream.py`` leaves it (``--data_dir D``)::

    D/metadata/<hex>.parquet      the nine metadata columns; one row = one pool sample, downloaded or not
    D/metadata/<hex>.npz          with --download_npz: b32_img b32_txt l14_img l14_txt, rows = the parquet's
    D/shards/{n:08d}.tar          img2dataset's webdataset: <key>.jpg/.txt/.json (uid in the json)
    D/shards/{n:08d}.parquet      img2dataset's record: one row per attempted URL (uid, status, …)
    D/shards/{n:08d}_stats.json   img2dataset's counts

The metadata files are the pool's unit of work (filters decide on metadata, as DataComp's baselines
do); the image shards are joined to them by uid. Metadata files follow no shard order, so the join
is read from img2dataset's records: which image shards hold each metadata file's samples. Nothing is
copied; the pool stage writes the join into its manifest.
"""
from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from winnow import io as wio
from winnow.pool import uids as U
from winnow.pool.shards import ShardError

IMAGE_SHARD = re.compile(r"^\d+$")     # img2dataset: {n:0<oom_shard_count>d}
SUCCESS = "success"


def is_download_dir(uri: str) -> bool:
    """True when ``uri`` is a download's ``--data_dir`` (it holds ``metadata/``, even an empty one:
    an interrupted download is then named as such, not taken for another layout)."""
    meta = wio.join(uri, "metadata")
    if wio.is_remote(meta):   # a prefix exists when something is under it (a part_0/ folder included)
        from winnow import s3

        return bool(s3.list_objects(str(meta)))
    return wio.local(meta).is_dir()


def locate(uri: str | None, metadata_uri: str | None = None, shards_uri: str | None = None) -> tuple[str, str | None]:
    """(metadata dir, image shards dir or None): explicit URIs win over ``uri``'s ``metadata/``
    and ``shards/`` children; a download run with ``--skip_shards`` has no shards dir."""
    meta = metadata_uri or (str(wio.join(uri, "metadata")) if uri else None)
    if not meta:
        raise ShardError("pool.source datacomp needs pool.uri (the download's --data_dir) or pool.metadata_uri")
    imgs = shards_uri
    if imgs is None and uri:
        cand = str(wio.join(uri, "shards"))
        try:
            wio.list_names(cand)
            imgs = cand
        except FileNotFoundError:
            imgs = None
    return meta, imgs


def metadata_files(metadata_uri: str) -> list[str]:
    """Stems of the metadata parquet files, sorted by name (their order means nothing)."""
    try:
        names = wio.list_names(metadata_uri)
    except FileNotFoundError:
        raise ShardError(f"metadata directory not found: {metadata_uri}") from None
    stems = sorted(n[: -len(".parquet")] for n in names if n.endswith(".parquet") and not n.startswith("."))
    if not stems:
        raise ShardError(f"no .parquet metadata files in {metadata_uri} (download_upstream.py writes them there "
                         "first; a download split in parts, e.g. metadata/part_0/, needs pool.metadata_uri set to "
                         "one part, or the parts' files moved into one folder)")
    return stems


def _shard_names(shards_uri: str) -> list[str]:
    try:
        return wio.list_names(shards_uri)
    except FileNotFoundError:
        raise ShardError(f"image shards directory not found: {shards_uri}") from None


def _shard_stems(names: list[str], suffix: str) -> list[str]:
    stems = [n[: -len(suffix)] for n in names if n.endswith(suffix)]
    return sorted((s for s in stems if IMAGE_SHARD.match(s)), key=int)


class UnreadableRecord(ShardError):
    """A record parquet that is not a parquet file (no footer): a shard img2dataset never finished,
    unless its ``_stats.json`` says it did."""


def read_records(shards_uri: str, shard: str) -> pa.Table:
    """img2dataset's record of one shard: ``uid`` and ``status`` of every URL it attempted."""
    p = wio.join(shards_uri, f"{shard}.parquet")
    try:
        t = pq.read_table(wio.source(p))
    except FileNotFoundError:
        raise ShardError(f"image shard {shard}: record {p} is missing") from None
    except pa.ArrowInvalid as exc:     # no footer (or no magic bytes): what a killed img2dataset leaves
        raise UnreadableRecord(f"image shard {shard}: cannot read {p}: {exc}") from None
    except OSError as exc:             # an I/O failure says nothing about the shard: never quarantined
        raise ShardError(f"image shard {shard}: cannot read {p}: {exc}") from None
    missing = [c for c in ("uid", "status") if c not in t.column_names]
    if missing:
        raise ShardError(f"image shard {shard}: {p} lacks column(s) {missing} (img2dataset must be run with "
                         "save_additional_columns=['uid'], as DataComp's download_upstream.py does)")
    return t.select(["uid", "status"])


def join(metadata_uri: str, stems: list[str], shards_uri: str | None) -> dict:
    """Which image shards hold each metadata file's samples, and the download's counts.

    Returns ``{"by_file": {stem: [image shards]}, "image_shards": [...], "counts": {...}}``; a record
    whose uid is in no metadata file is counted (``unknown_uids``), never an error; ``downloaded``
    counts metadata uids with a successful record, once each (``duplicate_downloads``: the records
    of a uid downloaded again, e.g. by two runs whose shards were merged).
    """
    counts = {"metadata_rows": 0, "attempted": 0, "downloaded": 0, "failed": 0, "unknown_uids": 0,
              "not_attempted": 0, "duplicate_downloads": 0, "tars_without_record": 0, "unfinished_shards": 0,
              "status": {}}
    if shards_uri is None:
        return {"by_file": {s: [] for s in stems}, "image_shards": [], "counts": counts}
    # the metadata's uids, sorted, each with its file: one searchsorted per record file finds owners
    parts, owner = [], []
    for k, stem in enumerate(stems):
        try:
            col = pq.read_table(wio.source(wio.join(metadata_uri, f"{stem}.parquet")), columns=["uid"])["uid"]
        except (pa.ArrowInvalid, OSError, KeyError) as exc:
            raise ShardError(f"metadata file {stem}: cannot read its uid column: {exc}") from None
        try:
            arr = U.hex_to_array(col, sort=False)
        except U.UidError as exc:
            raise ShardError(f"metadata file {stem}: {exc}") from None
        parts.append(arr)
        owner.append(np.full(len(arr), k, np.int32))
    uids = np.concatenate(parts) if parts else np.zeros(0, U.UID_DTYPE)
    owner = np.concatenate(owner) if owner else np.zeros(0, np.int32)
    order = np.lexsort((uids["f1"], uids["f0"]))
    uids, owner = uids[order], owner[order]
    counts["metadata_rows"] = int(len(uids))
    attempted = np.zeros(len(uids), bool)
    downloaded = np.zeros(len(uids), bool)       # a metadata uid with a successful record (counted once)
    by_file: dict[str, list[str]] = {s: [] for s in stems}
    names = _shard_names(shards_uri)       # listed once: the records, and the tars without one
    finished = set(_shard_stems(names, "_stats.json"))
    shard_list, unfinished = [], []
    for shard in _shard_stems(names, ".parquet"):
        try:
            rec = read_records(shards_uri, shard)
        except UnreadableRecord:
            # img2dataset opens a shard's record parquet first and writes its footer, then
            # <shard>_stats.json, only when the shard is done: a footerless record without stats
            # is a shard a killed download left, quarantined and counted; with stats, it is damage
            if shard in finished:
                raise
            unfinished.append(shard)
            continue
        shard_list.append(shard)
        raw = rec["uid"].to_numpy(zero_copy_only=False)
        valid = np.array([isinstance(u, str) and U.is_valid_hex(u) for u in raw], bool)
        q = U.hex_to_array(raw[valid], sort=False)
        pos = np.searchsorted(uids, q)
        pos_c = np.minimum(pos, max(len(uids) - 1, 0))
        hit = (pos < len(uids)) & (uids[pos_c] == q) if len(uids) else np.zeros(len(q), bool)
        counts["unknown_uids"] += int((~hit).sum() + (~valid).sum())
        attempted[pos_c[hit]] = True
        for k in np.unique(owner[pos_c[hit]]):
            by_file[stems[k]].append(shard)
        status = rec["status"].to_numpy(zero_copy_only=False)
        for s, n in zip(*np.unique(status.astype(str), return_counts=True)):
            counts["status"][s] = counts["status"].get(s, 0) + int(n)
        counts["attempted"] += len(status)
        counts["failed"] += int((status != SUCCESS).sum())
        # a uid downloaded by two runs (their shards merged) is one sample, not two
        got = pos_c[hit & (status[valid] == SUCCESS)]
        counts["duplicate_downloads"] += int(downloaded[got].sum()) + len(got) - len(np.unique(got))
        downloaded[got] = True
    counts["downloaded"] = int(downloaded.sum())
    counts["not_attempted"] = int((~attempted).sum())
    # a tar without any record parquet: its samples cannot be joined to the metadata
    orphans = sorted(set(_shard_stems(names, ".tar")) - set(shard_list) - set(unfinished), key=int)
    counts["tars_without_record"], counts["tars_without_record_examples"] = len(orphans), orphans[:5]
    counts["unfinished_shards"], counts["unfinished_shards_examples"] = len(unfinished), unfinished[:5]
    return {"by_file": by_file, "image_shards": shard_list, "counts": counts}


def downloaded_mask(uids: np.ndarray, shards_uri: str, image_shard_list: list[str]) -> np.ndarray:
    """For one metadata file's uids: True where img2dataset recorded a successful download."""
    import pyarrow.compute as pc

    if not image_shard_list or not len(uids):
        return np.zeros(len(uids), bool)
    records = pa.concat_tables([read_records(shards_uri, s) for s in image_shard_list])
    ok = records.filter(pc.equal(records["status"], SUCCESS))["uid"]
    return pc.is_in(pa.array(uids, pa.string()), value_set=ok.combine_chunks()).to_numpy(zero_copy_only=False)
