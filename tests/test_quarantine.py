"""A truncated tar is counted and quarantined, not a crash: the pool gate decides by threshold, the
embed stage marks the images after the cut missing, the resharder writes what precedes it."""
import shutil
import tarfile
from collections import defaultdict

import numpy as np
import pandas as pd

from winnow.embed import embed_pool
from winnow.jobs import WorkDir
from winnow.pool import checks, shards
from winnow.pool import uids as U
from winnow.pool.view import Pool
from winnow.reshard import reshard
from winnow.validate import Gate, GateError


def _truncate(pool_dir, shard="00000001") -> int:
    """Cut the shard's tar in half; return how many samples keep their image and their json (the
    uid) whole before the cut, counted from the member offsets of the intact tar."""
    p = pool_dir / f"{shard}.tar"
    cut = p.stat().st_size // 2
    ends = defaultdict(dict)
    with tarfile.open(p) as tf:
        for m in tf:
            key, _, ext = m.name.partition(".")
            ends[key][ext] = m.offset_data + m.size
    p.write_bytes(p.read_bytes()[:cut])
    return sum(e["jpg"] <= cut and e["json"] <= cut for e in ends.values())


def test_truncated_tar_is_quarantined_by_threshold(demo_pool, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                       # gates write reports/validation here
    pool_dir = tmp_path / "pool"
    shutil.copytree(demo_pool, pool_dir)
    whole = _truncate(pool_dir)
    pool = Pool.open(str(pool_dir))

    strict = Gate("pool")
    checks.check_pool(pool, strict)
    try:
        strict.finish()
        raise AssertionError("a truncated tar must fail the strict gate")
    except GateError as exc:
        assert "tar_readable" in str(exc) and "00000001" in str(exc)
    lenient = Gate("pool")
    stats = checks.check_pool(pool, lenient, max_unreadable_tars=0.5)
    lenient.finish()                                  # 1 of 3 shards is within the threshold
    assert stats["unreadable_tars"] == 1

    work = WorkDir("embed", "test", tmp_path)
    res = embed_pool(pool, {"model": "winnow-tiny", "weights": None}, work, batch_size=64, workers=0)
    bad = res[1]
    assert bad["tar_error"] and "00000001" in bad["tar_error"]
    assert bad["embedded"] == whole and bad["missing_images"] == bad["rows"] - whole
    assert not res[0]["tar_error"] and res[0]["embedded"] == res[0]["rows"]
    df = pd.read_parquet(work.path / "00000001.parquet")
    assert (~df.image_ok).sum() == bad["missing_images"]

    every = np.concatenate([shards.read_meta(str(pool_dir), s, ["uid"])["uid"].to_numpy(zero_copy_only=False)
                            for s in pool.shards])
    meta = reshard(pool, U.hex_to_array(every), str(tmp_path / "subset"), shard_size=100)
    assert len(meta["unreadable_tars"]) == 1 and meta["uids_not_found"] == bad["missing_images"]
    assert meta["output_count"] == len(every) - bad["missing_images"]
