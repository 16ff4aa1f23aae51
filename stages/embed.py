"""Stage `embed`: image, flipped-image and text embeddings of every pool shard from the scorer;
undecodable images are quarantined and counted; gate: rows aligned, embeddings finite and unit.
Shards are the units of a job whose work directory is keyed by the scorer, the pool's content, the
encoding settings and the code (winnow.jobs), so a killed run resumes without recomputing finished
shards."""
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from winnow import models
from winnow.config import Params
from winnow.embed import embed_pool, embed_targets
from winnow.io import atomic_dir, cache_local, read_json, write_json
from winnow.jobs import Key, WorkDir
from winnow.pool import shards
from winnow.pool.view import Pool
from winnow.stage import main
from winnow.tasks import load_suite
from winnow.validate import Gate, expect

OUT = "data/embed"


def work_key(spec: dict, p: Params, pool: Pool, encode: list[str], device: str, compile_: bool) -> Key:
    """Everything the shard outputs depend on: the scorer (architecture, weights' content), what is
    encoded and how (batch size, decoder, device type: bf16 on CUDA), the pool's content, the code."""
    weights = models.resolve_weights(spec["weights"])
    key = Key("embed").params(model=spec["model"], name=spec["name"], encode=sorted(encode), batch_size=p.embed.batch_size,
                              decode=p.embed.decode, device=device.split(":")[0], compile=compile_,
                              weights_tag=str(spec["weights"]))
    return key.files(weights=weights if weights and os.path.exists(weights) else None, pool=pool.uri,
                     images=pool.images_uri if pool.is_download else None).code("winnow.embed")


def body(p: Params) -> dict:
    plan = read_json("data/plan/needs.json")
    if not plan["scorer"]:   # the recipe reads only what the pool has: nothing to compute
        with atomic_dir(OUT) as tmp:
            write_json(tmp / "meta.json", {"keys": [], "shards": 0, "targets": {},
                                           "skipped": "the recipe needs no new embeddings (data/plan/needs.json)"})
        Gate("embed").finish()   # nothing to check: the report says so
        return {"shards": 0}
    spec = read_json("models/scorer/scorer.json")
    pool = Pool.open("data/pool")
    name = spec["name"]
    encode = plan["encode"]
    cuda = torch.cuda.device_count()
    devices = p.embed.devices if p.embed.devices != "auto" else ([f"cuda:{i}" for i in range(cuda)] or ["cpu"])
    compile_ = bool(cuda) if p.embed.compile == "auto" else p.embed.compile
    work = WorkDir("embed", work_key(spec, p, pool, encode, devices[0], compile_))
    per_shard = embed_pool(pool, {"model": spec["model"], "weights": spec["weights"]}, work, name=name,
                           batch_size=p.embed.batch_size, workers=p.embed.workers, devices=devices, compile=compile_,
                           decode=p.embed.decode, encode=encode) if encode else []
    model, pre, tok = models.load(spec["model"], spec["weights"])
    with atomic_dir(OUT) as tmp:
        for f in sorted([*work.path.glob("*.npz"), *work.path.glob("*.parquet")]):
            try:   # linked, not moved: a failed gate below keeps the finished shards
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
        targets = embed_targets(load_suite(p.eval.suite), str(cache_local(p.eval.data_root)), model, pre, tok, str(tmp),
                                batch_size=p.embed.batch_size, workers=p.embed.workers) if plan["targets"] else {}
        counts = {"rows": 0, "embedded": 0}

        def frames():
            """The embed outputs one shard at a time, with whether each row's embeddings are unit."""
            for s in pool.shards:
                df = pd.read_parquet(tmp / f"{s}.parquet")
                arr = shards.read_npz(str(tmp), s)
                ok = df["image_ok"].to_numpy()
                unit = np.ones(len(df), bool)
                for k, v in arr.items():
                    rows = ok if k.endswith(("_img", "_img_flip")) else np.ones(len(df), bool)
                    norm = np.linalg.norm(v, axis=1)
                    unit &= ~rows | (np.isfinite(norm) & (np.abs(norm - 1) < 1e-2))
                df["unit_norm"] = unit
                counts["rows"] += len(df)
                counts["embedded"] += int(ok.sum())
                yield df

        pixels = bool({"img", "flip"} & set(encode))
        E = expect()
        gate = Gate("embed")
        if encode:
            columns = pq.read_schema(tmp / f"{pool.shards[0]}.parquet").names   # every shard's: one writer
            rules = [E.ExpectColumnValuesToBeInSet(column="unit_norm", value_set=[True])]
            if pixels:   # on a download, rows whose image never downloaded have none: link rot is normal
                floor = p.pool.min_downloaded if pool.is_download else 0.8
                rules.append(E.ExpectColumnValuesToBeInSet(column="image_ok", value_set=[True], mostly=floor))
            for col in (f"{name}_score", f"{name}_flip_score"):
                if col in columns:
                    rules.append(E.ExpectColumnValuesToBeBetween(column=col, min_value=-1.0001, max_value=1.0001))
            gate.check_stream("embeddings", frames(), rules)
        if pixels and per_shard:
            gate.check("shards", pd.DataFrame(per_shard).drop(columns=["corrupt_uids"]), [
                E.ExpectColumnValuesToBeBetween(column="embedded", min_value=1),
            ], id_column="shard")
        gate.finish()
        suffix = {"img": "_img", "flip": "_img_flip", "txt": "_txt"}
        summary = {"shards": len(per_shard), "rows": counts["rows"], "embedded": counts["embedded"],
                   "corrupt_images": int(sum(r["corrupt_images"] for r in per_shard)),
                   "missing_images": int(sum(r["missing_images"] for r in per_shard)),
                   "unreadable_tars": int(sum(bool(r.get("tar_error")) for r in per_shard)),
                   "keys": [f"{name}{suffix[e]}" for e in ("img", "flip", "txt") if e in encode], "scorer": spec,
                   "targets": targets}
        write_json(tmp / "meta.json", summary | {"per_shard": per_shard, "devices": devices, "compile": compile_})
    work.release()
    return {k: v for k, v in summary.items() if isinstance(v, int)}


if __name__ == "__main__":
    main("embed", body)
