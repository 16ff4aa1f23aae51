"""Stage `reshard`: the subset as webdataset shards (duplicates = copies) + meta.json;
gate: every selected uid is in the pool, the written share is at least the download floor, and on a
real pool at most ``pool.max_unreadable_tars`` of the image tars read are truncated or corrupt."""
from pathlib import Path

import pandas as pd

from winnow.config import Params
from winnow.jobs import WORK_ROOT
from winnow.pool import uids as U
from winnow.pool.view import Pool
from winnow.reshard import plan, reshard
from winnow.stage import main
from winnow.validate import Gate, expect

OUT = "data/subset"


def body(p: Params) -> dict:
    subset = U.SortedUids("data/filter/uids.npy")      # read a slice at a time
    pool = Pool.open("data/pool")
    with plan(pool, subset, spill_root=WORK_ROOT) as where:     # which shards hold the subset, in bounded memory
        meta = reshard(pool, subset, OUT, shard_size=p.pool.shard_size,
                       work_root=WORK_ROOT, where=where)   # closed output shards survive a kill
    E = expect()
    gate = Gate("reshard")
    # uids whose image never downloaded are expected on real pools (the resharder warns); on a
    # download the gate asks for the pool's own downloaded share, on the demo for most of them
    floor = p.pool.min_downloaded if pool.is_download else 0.8
    row = {"output_count": meta["output_count"], "output_shard_count": meta["output_shard_count"],
           "written_fraction": meta["output_count"] / max(1, meta["input_uids"]),
           # the files themselves, not only the counts: an output that lost its tars must not pass
           "tars_missing": meta["output_shard_count"] - len(list(Path(OUT).glob("*.tar")))}
    gate.check("subset", pd.DataFrame([{"selected": where["selected"], "not_in_pool": where["not_in_pool"],
                                        "examples": ", ".join(where["not_in_pool_examples"])}]),
               [E.ExpectColumnValuesToBeBetween(column="not_in_pool", max_value=0)], id_column="examples")
    if pool.is_download:   # a real pool's tars are first read here (its pool gate reads metadata only)
        tars = where["image_shards"]
        gate.check("tars", pd.DataFrame([{"tar": t, "readable": t not in meta["unreadable_tars"]} for t in tars]
                                        or [{"tar": "", "readable": True}]),
                   [E.ExpectColumnValuesToBeInSet(column="readable", value_set=[True],
                                                  mostly=1.0 - p.pool.max_unreadable_tars)], id_column="tar")
    gate.check("meta", pd.DataFrame([row]), [
        E.ExpectColumnValuesToBeBetween(column="written_fraction", min_value=floor, max_value=1.0),
        E.ExpectColumnValuesToBeBetween(column="output_shard_count", min_value=1),
        E.ExpectColumnValuesToBeBetween(column="tars_missing", min_value=0, max_value=0),
    ], id_column="output_count")
    gate.finish()
    return {k: v for k, v in meta.items() if isinstance(v, int)}


if __name__ == "__main__":
    main("reshard", body)
