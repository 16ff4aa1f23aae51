"""Write the selected uids as webdataset shards, DataComp resharder semantics: a uid that occurs
n times in the subset is written n times (keys ``<uid>-<j>``); uids not found in the pool's image
shards (never downloaded, or quarantined) are counted and reported, as the resharder warns about
failed downloads. On DataComp's download layout the image shards are img2dataset's, read in their
numeric order; the subset was chosen on the metadata, so its undownloaded part is expected."""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
from tqdm import tqdm

from winnow import io as wio
from winnow import jobs
from winnow.io import atomic_dir, link_or_copy, write_json
from winnow.pool import shards
from winnow.pool import uids as U
from winnow.pool.view import Pool


def reshard(pool: Pool, subset, out: str, shard_size: int = 10000, work_root: str | None = None,
            where: "Placement | None" = None) -> dict:
    """Write the subset (a sorted uid array, or the path of its ``.npy``) under ``out`` (atomic),
    reading only the image shards that hold selected samples (``where``: this subset's
    :func:`plan`, made here when not given). With ``work_root``, output shards are built in the
    job's work directory (keyed by the pool's content, the subset, the shard size and the code),
    each unit an output shard marked complete when closed: a killed run resumes after the last
    complete shard (the input is re-read up to that point, nothing finished is re-written), and the
    result is byte-identical to an uninterrupted run."""
    subset = subset if isinstance(subset, U.SortedUids) else U.SortedUids(subset)
    tmp_root = None if work_root else tempfile.mkdtemp(prefix="winnow-reshard-")
    own = where is None
    where = where or plan(pool, subset)
    try:
        work = jobs.WorkDir("reshard", work_key(pool, subset, shard_size), work_root or tmp_root)
        with atomic_dir(out) as tmp:
            meta = _write(pool, subset, work, shard_size, where)
            # linked, not moved: a kill before the commit must find every closed shard still in the
            # work directory, where its marker says it is
            for f in sorted(work.path.glob("*.tar")):
                link_or_copy(f, tmp / f.name)
            for name in ("sample_ids.npy", "meta.json"):
                link_or_copy(work / name, tmp / name)
        work.release()
    finally:
        if own:
            where.close()
        if tmp_root:
            shutil.rmtree(tmp_root, ignore_errors=True)
    return meta


# Partitions by a uid's leading byte: uids are hashes, so each holds ~1/256 of pool and subset.
# plan() processes runs of them of at most PART_ROWS pool rows + subset entries at a time (about
# 60 bytes of working arrays each): small enough that DataComp small's 1.28M slice already fills a
# run, so peak memory is the same at 12.8M (measured: 1 << 20 grew 21% between the two).
PART_ROWS = 1 << 19
_SELECTED = np.dtype([("f0", "u8"), ("f1", "u8"), ("copies", "u8")])


class Placement:
    """Where a subset lies in the pool (:func:`plan`): the summary as mapping keys (``pool_rows``,
    ``selected``, ``per_shard``, ``image_shards``, ``not_in_pool``, ``not_in_pool_examples``) and,
    spilled to a temp file, each pool shard's selected uids with their copies, which the resharder
    reads one shard at a time. ``close()`` deletes the spill."""

    def __init__(self, summary: dict, spill_dir: str, index: np.ndarray, shards: list[str]):
        self.summary, self._dir, self._index = summary, spill_dir, index
        self._shard_pos = {s: i for i, s in enumerate(shards)}

    def __getitem__(self, key):
        return self.summary[key]

    def selected(self, shard: str) -> tuple[np.ndarray, np.ndarray]:
        """The shard's selected uids (sorted byte keys) and how many copies of each the subset holds."""
        k = self._shard_pos[shard]
        parts = [np.fromfile(os.path.join(self._dir, "selected"), _SELECTED, count=int(b - a),
                             offset=int(a) * _SELECTED.itemsize)
                 for a, b in zip(self._index[:, k], self._index[:, k + 1]) if b > a]
        rows = np.concatenate(parts) if parts else np.zeros(0, _SELECTED)
        uids = np.empty(len(rows), U.UID_DTYPE)
        uids["f0"], uids["f1"] = rows["f0"], rows["f1"]
        order = np.argsort(keys := U.byte_keys(uids), kind="stable")
        return keys[order], rows["copies"][order].astype(np.int64)

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def plan(pool: Pool, subset, examples: int = 5, spill_root: str | None = None) -> Placement:
    """Where the subset (a sorted uid array, or its ``.npy`` path) lies in the pool: per shard how
    many selected samples it holds (copies counted), the image shards that hold any (the only tars
    the resharder opens), and the selected uids the pool lacks (count and a few examples).

    Memory stays flat as pool and subset grow: the pool's uids are read one shard at a time and
    spilled to disk grouped by leading byte; then each run of byte partitions (at most PART_ROWS
    rows) is matched against the same partitions of the subset, read as a slice of its file."""
    subset = subset if isinstance(subset, U.SortedUids) else U.SortedUids(subset)
    if spill_root:
        os.makedirs(spill_root, exist_ok=True)
        wio.sweep_stale(spill_root)    # what a killed plan left (its owner, in its name, is dead)
        spill = os.path.join(spill_root, wio.temp_name("winnow-plan"))
        os.mkdir(spill)
    else:
        spill = tempfile.mkdtemp(prefix="winnow-plan-")
    try:
        return _plan(pool, subset, examples, spill)
    except BaseException:
        shutil.rmtree(spill, ignore_errors=True)
        raise


def _plan(pool: Pool, subset: U.SortedUids, examples: int, spill: str) -> Placement:
    # pass 1: every pool shard's uids, sorted by leading byte, appended to one file; index[k, b] is
    # where shard k's uids with leading byte b start
    index = np.zeros((len(pool.shards), 257), np.int64)
    at = 0
    with open(os.path.join(spill, "pool"), "wb") as fh:
        for k, shard in enumerate(tqdm(pool.shards, desc="reshard plan", unit="shard",
                                       disable=len(pool.shards) < 2)):
            q = U.hex_to_array(shards.read_meta(pool.uri, shard, columns=["uid"])["uid"], sort=False)
            lead = (q["f0"] >> np.uint64(56)).astype(np.intp)
            fh.write(q[np.argsort(lead, kind="stable")].tobytes())
            index[k] = at + np.concatenate([[0], np.cumsum(np.bincount(lead, minlength=256))])
            at += len(q)
    rows = at
    # pass 2: runs of byte partitions, pool side and subset side together
    per_byte = (index[:, 1:] - index[:, :-1]).sum(axis=0) + subset.per_byte
    runs, b = [], 0
    while b < 256:
        e, size = b + 1, per_byte[b]
        while e < 256 and size + per_byte[e] <= PART_ROWS:
            size += per_byte[e]
            e += 1
        runs.append((b, e))
        b = e
    per_shard = np.zeros(len(pool.shards), np.int64)
    sel_index = np.zeros((len(runs), len(pool.shards) + 1), np.int64)    # per run, per shard: its selected rows
    missing, missing_examples, written = 0, [], 0
    with open(os.path.join(spill, "selected"), "wb") as out:
        for r, (b, e) in enumerate(runs):
            n = index[:, e] - index[:, b]
            parts = [np.fromfile(os.path.join(spill, "pool"), U.UID_DTYPE, count=int(c),
                                 offset=int(index[k, b]) * U.UID_DTYPE.itemsize)
                     for k, c in enumerate(n) if c]
            q = np.concatenate(parts) if parts else np.zeros(0, U.UID_DTYPE)
            owner = np.repeat(np.arange(len(pool.shards)), n)
            sub = subset.read(int(subset.byte_starts[b]), int(subset.byte_starts[e]))
            keys = U.byte_keys(sub)
            lo, hi = U.search(keys, q)
            copies = hi - lo
            per_shard += np.bincount(owner, weights=copies, minlength=len(pool.shards)).astype(np.int64)
            hit = copies > 0
            found = np.zeros(len(sub), bool)      # at the first entry of each selected uid the pool holds
            found[lo[hit]] = True
            first = np.ones(len(keys), bool)        # an entry that starts its uid's run of copies
            first[1:] = keys[1:] != keys[:-1]
            lacks = np.flatnonzero(first & ~found)
            missing += len(lacks)
            if len(missing_examples) < examples:
                missing_examples += U.array_to_hex(sub[lacks[: examples - len(missing_examples)]]).tolist()
            rec = np.empty(int(hit.sum()), _SELECTED)
            rec["f0"], rec["f1"], rec["copies"] = q["f0"][hit], q["f1"][hit], copies[hit]
            out.write(rec.tobytes())                 # grouped by shard: q is in shard order
            sel_index[r] = written + np.concatenate([[0], np.cumsum(np.bincount(owner[hit],
                                                                              minlength=len(pool.shards)))])
            written += len(rec)
    os.remove(os.path.join(spill, "pool"))
    holding = [s for s, c in zip(pool.shards, per_shard) if c]
    lacking = len(subset) - int(per_shard.sum())     # entries, copies counted (pool uids are unique: its gate)
    image_shards = set().union(*(pool.image_shards(s) for s in holding)) if holding else set()
    summary = {"pool_rows": rows, "selected": len(subset),
               "per_shard": {s: int(c) for s, c in zip(pool.shards, per_shard) if c},
               "image_shards": [s for s in pool.all_image_shards() if s in image_shards],
               "not_in_pool": int(max(lacking, missing)), "not_in_pool_examples": missing_examples}
    return Placement(summary, spill, sel_index, list(pool.shards))


def work_key(pool: Pool, subset: U.SortedUids, shard_size: int) -> jobs.Key:
    return (jobs.Key("reshard").params(manifest=pool.manifest, shard_size=shard_size, subset=subset.digest())
            .files(images=pool.images_uri).code(__name__))


def _complete(work) -> list[int]:
    """Counts of the output shards already closed (a contiguous run from 0); later tars are partial."""
    counts = []
    while (stats := work.done(f"{len(counts):08d}")) is not None:
        counts.append(stats["count"])
    for f in work.path.glob("*.tar"):
        if int(f.stem) >= len(counts):
            f.unlink()
    return counts


def _write(pool: Pool, subset: U.SortedUids, work, shard_size: int, where: Placement) -> dict:
    """The image tars in order; each tar's samples are looked up in the selected uids of the pool
    shards it belongs to (read from the plan's spill, one shard at a time, dropped after its last tar)."""
    import webdataset as wds

    build = work.path
    found = written = seen_entries = duplicates = incomplete = not_utf8 = 0
    owners: dict[str, list[str]] = {}            # image tar -> the pool shards whose samples it holds
    for s in where["per_shard"]:
        for t in pool.image_shards(s):
            owners.setdefault(t, []).append(s)
    last_tar = {s: t for t in where["image_shards"] for s in owners.get(t, [])}
    loaded: dict[str, list] = {}                 # shard -> [keys, copies, seen]
    counts = _complete(work)
    skip = sum(counts)           # samples already in closed output shards
    sink = None

    def close():
        sink.close()
        work.mark(f"{len(counts) - 1:08d}", {"count": counts[-1]})

    unreadable: dict[str, str] = {}              # image tar -> why it could not be read to its end
    for tar in tqdm(where["image_shards"], desc="reshard", unit="shard"):   # the tars that hold selected samples
        mine = owners.get(tar, [])
        for s in mine:
            if s not in loaded:
                keys, copies = where.selected(s)
                loaded[s] = [keys, copies, np.zeros(len(keys), bool)]
        samples = []
        try:
            for x in shards.iter_tar(pool.images_uri, tar):
                if U.is_valid_hex(str(x["json"].get("uid", ""))):
                    samples.append(x)
        except shards.ShardError as exc:   # a truncated tar: what precedes the cut is written, the rest counted
            unreadable[tar] = str(exc)
        if samples and mine:
            q = U.hex_to_array([x["json"]["uid"] for x in samples], sort=False)
            hits = [None] * len(samples)
            for s in mine:
                keys, copies, seen = loaded[s]
                lo, hi = U.search(keys, q)            # a shard's selected uids are unique: hi - lo is 0 or 1
                for i in np.flatnonzero(hi > lo):
                    hits[i] = (seen, int(lo[i]), int(copies[lo[i]]))
            for x, h in zip(samples, hits):
                if h is None:
                    continue
                seen, i, n = h
                if seen[i]:               # downloaded again into another tar: written once
                    duplicates += 1
                    continue
                if x["jpg"] is None or x["txt"] is None:   # a member lost to a cut tar: unusable, counted
                    incomplete += 1
                    continue
                seen[i] = True
                found += 1
                not_utf8 += x.get("txt_not_utf8", False)      # written with U+FFFD for the bad bytes, counted
                uid = x["json"]["uid"]
                for j in range(n):
                    written += 1
                    if written <= skip:
                        continue
                    if sink is None or counts[-1] >= shard_size:
                        if sink is not None:
                            close()
                        sink = wds.TarWriter(str(build / f"{len(counts):08d}.tar"), mtime=shards.FIXED_MTIME)
                        counts.append(0)
                    sink.write({"__key__": f"{uid}-{j}", x["ext"]: x["jpg"], "txt": x["txt"], "json": x["json"]})
                    counts[-1] += 1
        for s in mine:
            if last_tar.get(s) == tar:                # the shard's last tar: its selection is done
                keys, copies, seen = loaded.pop(s)
                seen_entries += int(copies[seen].sum())
    if sink is not None:
        close()
    for keys, copies, seen in loaded.values():
        seen_entries += int(copies[seen].sum())
    subset.save(build / "sample_ids.npy")
    meta = {"output_shard_count": len(counts), "output_count": written,
            "output_shard_format": "{:08d}.tar", "input_uids": len(subset),
            "unique_uids_found": found, "uids_not_found": len(subset) - seen_entries,
            "unreadable_tars": unreadable, "duplicate_downloads": duplicates, "incomplete_samples": incomplete,
            "captions_not_utf8": not_utf8, "shard_sizes": counts}
    write_json(build / "meta.json", meta)
    return meta


def brace_pattern(out: str, meta: dict) -> str:
    """The ``{00000000..N}.tar`` pattern open_clip_train reads, as DataComp's train.py builds it."""
    n = meta["output_shard_count"]
    return f"{out}/{{{0:08d}..{n - 1:08d}}}.tar" if n > 1 else f"{out}/00000000.tar"
