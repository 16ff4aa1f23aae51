"""Stage `pool`: generate the demo pool, or reference an existing DataComp pool; gate it."""
from winnow import io as wio
from winnow.config import Params
from winnow.io import atomic_dir, write_json
from winnow.pool import checks, demo, shards
from winnow.pool.view import Pool
from winnow.stage import main
from winnow.validate import Gate

OUT = "data/pool"


def body(p: Params) -> dict:
    if p.pool.source == "demo":
        summary = demo.write_pool(p.pool, p.seed, OUT)
    else:   # an external pool: nothing is copied, the manifest points at it
        found = shards.discover(p.pool.uri)
        uri = p.pool.uri if wio.is_remote(p.pool.uri) else str(wio.local(p.pool.uri).resolve())
        summary = {"source": "datacomp", "uri": uri, "shards": found,
                   "num_shards": len(found)}
        with atomic_dir(OUT) as tmp:
            write_json(tmp / "manifest.json", summary)
    gate = Gate("pool")
    stats = checks.check_pool(Pool.open(OUT), gate, max_unreadable_tars=p.pool.max_unreadable_tars)
    gate.finish()
    return {"num_shards": summary["num_shards"], **stats}


if __name__ == "__main__":
    main("pool", ["seed", "pool"], body)
