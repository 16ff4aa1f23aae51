"""Write the selected uids as webdataset shards, DataComp resharder semantics: a uid that occurs
n times in the subset is written n times (keys ``<uid>-<j>``); uids not found in the pool's image
shards (never downloaded, or quarantined) are counted and reported, as the resharder warns about
failed downloads. On DataComp's download layout the image shards are img2dataset's, read in their
numeric order; the subset was chosen on the metadata, so its undownloaded part is expected."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from winnow.io import atomic_dir, keyed_work_dir, read_json, write_json
from winnow.pool import shards
from winnow.pool import uids as U
from winnow.pool.view import Pool


def reshard(pool: Pool, subset: np.ndarray, out: str, shard_size: int = 10000, work_dir: str | None = None) -> dict:
    """Write the subset under ``out`` (atomic). With ``work_dir``, output shards are built in a work
    directory keyed by the inputs, each marked complete by its ``_stats.json`` when closed: a killed
    run resumes after the last complete shard (the input is re-read up to that point, nothing
    finished is re-written), and the result is byte-identical to an uninterrupted run."""
    U.check_subset(subset)
    work = _work(work_dir, pool, subset, shard_size)
    with atomic_dir(out) as tmp:
        meta = _write(pool, subset, work or tmp, shard_size)
        if work:
            for f in work.iterdir():
                os.replace(f, tmp / f.name)
    if work:
        shutil.rmtree(work, ignore_errors=True)
    return meta


def _work(work_dir: str | None, pool: Pool, subset: np.ndarray, shard_size: int) -> Path | None:
    if not work_dir:
        return None
    key = hashlib.sha256(json.dumps([pool.uri, pool.manifest, shard_size], sort_keys=True).encode()
                         + subset.tobytes()).hexdigest()[:16]
    return keyed_work_dir(work_dir, key)


def _complete(build: Path) -> list[int]:
    """Counts of the output shards already closed (a contiguous run from 0); later files are partial."""
    counts = []
    while (build / f"{len(counts):08d}_stats.json").exists():
        counts.append(read_json(build / f"{len(counts):08d}_stats.json")["count"])
    for f in build.glob("*.tar"):
        if int(f.stem) >= len(counts):
            f.unlink()
    return counts


def _write(pool: Pool, subset: np.ndarray, build: Path, shard_size: int) -> dict:
    import webdataset as wds

    found = written = 0
    seen = np.zeros(len(subset), bool)
    counts = _complete(build)
    skip = sum(counts)           # samples already in closed output shards
    sink = None

    def close():
        sink.close()
        write_json(build / f"{len(counts) - 1:08d}_stats.json", {"count": counts[-1], "successes": counts[-1]})

    unreadable = []
    for shard in tqdm(pool.all_image_shards(), desc="reshard", unit="shard"):
        samples = []
        try:
            for s in shards.iter_tar(pool.images_uri, shard):
                if U.is_valid_hex(str(s["json"].get("uid", ""))):
                    samples.append(s)
        except shards.ShardError as exc:   # a truncated tar: what precedes the cut is written, the rest counted
            unreadable.append(str(exc))
        if not samples:
            continue
        q = U.hex_to_array([s["json"]["uid"] for s in samples], sort=False)
        lo = np.searchsorted(subset, q, side="left")
        hi = np.searchsorted(subset, q, side="right")
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
