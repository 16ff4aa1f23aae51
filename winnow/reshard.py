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

from winnow import jobs
from winnow.io import atomic_dir, write_json
from winnow.pool import shards
from winnow.pool import uids as U
from winnow.pool.view import Pool


def reshard(pool: Pool, subset: np.ndarray, out: str, shard_size: int = 10000, work_root: str | None = None,
            where: dict | None = None) -> dict:
    """Write the subset under ``out`` (atomic), reading only the image shards that hold selected
    samples (``where``: the subset's :func:`plan`, computed here when not given). With
    ``work_root``, output shards are built in the
    job's work directory (keyed by the pool's content, the subset, the shard size and the code),
    each unit an output shard marked complete when closed: a killed run resumes after the last
    complete shard (the input is re-read up to that point, nothing finished is re-written), and the
    result is byte-identical to an uninterrupted run."""
    U.check_subset(subset)
    tmp_root = None if work_root else tempfile.mkdtemp(prefix="winnow-reshard-")
    try:
        work = jobs.WorkDir("reshard", work_key(pool, subset, shard_size), work_root or tmp_root)
        with atomic_dir(out) as tmp:
            meta = _write(pool, subset, work, shard_size, (where or plan(pool, subset))["image_shards"])
            for f in sorted(work.path.glob("*.tar")):
                os.replace(f, tmp / f.name)
            for name in ("sample_ids.npy", "meta.json"):
                os.replace(work / name, tmp / name)
        work.release()
    finally:
        if tmp_root:
            shutil.rmtree(tmp_root, ignore_errors=True)
    return meta


def plan(pool: Pool, subset: np.ndarray, examples: int = 5) -> dict:
    """Where the subset lies in the pool, one shard's uid column at a time: per shard how many
    selected samples it holds (copies counted), the image shards that hold any (the only tars the
    resharder opens), and the selected uids the pool lacks (count and a few examples). Memory: the
    subset and its search keys (32 bytes per selected entry, as the resharder's own lookup needs
    the subset whole), two flags per entry and one shard."""
    U.check_subset(subset)
    found = np.zeros(len(subset), bool)      # at the first entry of each selected uid the pool holds
    keys = U.byte_keys(subset)
    per_shard, rows = {}, 0
    for shard in tqdm(pool.shards, desc="reshard plan", unit="shard", disable=len(pool.shards) < 2):
        q = U.hex_to_array(shards.read_meta(pool.uri, shard, columns=["uid"])["uid"], sort=False)   # from Arrow's buffer
        rows += len(q)
        lo, hi = U.search(keys, q)
        if (n := int((hi - lo).sum())):
            per_shard[shard] = n
            found[lo[hi > lo]] = True
    first = np.ones(len(keys), bool)        # an entry that starts its uid's run of copies
    first[1:] = keys[1:] != keys[:-1]
    del keys
    missing = np.flatnonzero(first & ~found)
    lacking = len(subset) - sum(per_shard.values())     # entries, copies counted (pool uids are unique: its gate)
    image_shards = set().union(*(pool.image_shards(s) for s in per_shard)) if per_shard else set()
    return {"pool_rows": rows, "selected": int(len(subset)), "per_shard": per_shard,
            "image_shards": [s for s in pool.all_image_shards() if s in image_shards],
            "not_in_pool": int(max(lacking, len(missing))),
            "not_in_pool_examples": U.array_to_hex(subset[missing[:examples]]).tolist()}


def work_key(pool: Pool, subset: np.ndarray, shard_size: int) -> jobs.Key:
    return (jobs.Key("reshard").params(manifest=pool.manifest, shard_size=shard_size, subset=U.digest(subset))
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


def _write(pool: Pool, subset: np.ndarray, work, shard_size: int, image_shards: list[str]) -> dict:
    import webdataset as wds

    build = work.path
    found = written = 0
    seen = np.zeros(len(subset), bool)
    keys = U.byte_keys(subset)       # once: every tar's uids are searched in them
    counts = _complete(work)
    skip = sum(counts)           # samples already in closed output shards
    sink = None

    def close():
        sink.close()
        work.mark(f"{len(counts) - 1:08d}", {"count": counts[-1]})

    unreadable = []
    for shard in tqdm(image_shards, desc="reshard", unit="shard"):   # the tars that hold selected samples
        samples = []
        try:
            for s in shards.iter_tar(pool.images_uri, shard):
                if U.is_valid_hex(str(s["json"].get("uid", ""))):
                    samples.append(s)
        except shards.ShardError as exc:   # a truncated tar: what precedes the cut is written, the rest counted
            unreadable.append(str(exc))
        if not samples:
            continue
        lo, hi = U.search(keys, U.hex_to_array([s["json"]["uid"] for s in samples], sort=False))
        for s, a, b in zip(samples, lo, hi):
            if b == a:
                continue
            seen[a:b] = True
            found += 1
            uid = s["json"]["uid"]
            for j in range(b - a):
                written += 1
                if written <= skip:
                    continue
                if sink is None or counts[-1] >= shard_size:
                    if sink is not None:
                        close()
                    sink = wds.TarWriter(str(build / f"{len(counts):08d}.tar"), mtime=shards.FIXED_MTIME)
                    counts.append(0)
                sink.write({"__key__": f"{uid}-{j}", "jpg": s["jpg"], "txt": s["txt"], "json": s["json"]})
                counts[-1] += 1
    if sink is not None:
        close()
    U.save(build / "sample_ids.npy", subset)
    meta = {"output_shard_count": len(counts), "output_count": written,
            "output_shard_format": "{:08d}.tar", "input_uids": int(len(subset)),
            "unique_uids_found": found, "uids_not_found": int((~seen).sum()),
            "unreadable_tars": unreadable, "shard_sizes": counts}
    write_json(build / "meta.json", meta)
    return meta


def brace_pattern(out: str, meta: dict) -> str:
    """The ``{00000000..N}.tar`` pattern open_clip_train reads, as DataComp's train.py builds it."""
    n = meta["output_shard_count"]
    return f"{out}/{{{0:08d}..{n - 1:08d}}}.tar" if n > 1 else f"{out}/00000000.tar"
