"""Write the selected uids as webdataset shards, DataComp resharder semantics: a uid that occurs
n times in the subset is written n times (keys ``<uid>-<j>``); uids not found in the pool are
counted and reported, as the resharder warns about failed downloads."""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from winnow.io import atomic_dir, write_json
from winnow.pool import shards
from winnow.pool import uids as U
from winnow.pool.view import Pool


def reshard(pool: Pool, subset: np.ndarray, out: str, shard_size: int = 10000) -> dict:
    import webdataset as wds

    U.check_subset(subset)
    found = 0
    written = 0
    seen = np.zeros(len(subset), bool)
    with atomic_dir(out) as tmp:
        sink = None
        counts: list[int] = []
        for shard in tqdm(pool.shards, desc="reshard", unit="shard"):
            samples = [s for s in shards.iter_tar(pool.uri, shard)
                       if U.is_valid_hex(str(s["json"].get("uid", "")))]
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
                    if sink is None or counts[-1] >= shard_size:
                        if sink is not None:
                            sink.close()
                        sink = wds.TarWriter(str(tmp / f"{len(counts):08d}.tar"), mtime=shards.FIXED_MTIME)
                        counts.append(0)
                    sink.write({"__key__": f"{uid}-{j}", "jpg": s["jpg"], "txt": s["txt"], "json": s["json"]})
                    counts[-1] += 1
                    written += 1
        if sink is not None:
            sink.close()
        for i, c in enumerate(counts):
            write_json(tmp / f"{i:08d}_stats.json", {"count": c, "successes": c})
        U.save(tmp / "sample_ids.npy", subset)
        meta = {"output_shard_count": len(counts), "output_count": written,
                "output_shard_format": "{:08d}.tar", "input_uids": int(len(subset)),
                "unique_uids_found": found, "uids_not_found": int((~seen).sum()),
                "shard_sizes": counts}
        write_json(tmp / "meta.json", meta)
    return meta


def brace_pattern(out: str, meta: dict) -> str:
    """The ``{00000000..N}.tar`` pattern open_clip_train reads, as DataComp's train.py builds it."""
    n = meta["output_shard_count"]
    return f"{out}/{{{0:08d}..{n - 1:08d}}}.tar" if n > 1 else f"{out}/00000000.tar"
