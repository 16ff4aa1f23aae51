"""Stage `pool`: generate the demo pool, or reference an existing DataComp pool; gate it.

An existing pool is either DataComp's download layout (``pool.uri`` = the download's ``--data_dir``
with ``metadata/`` and ``shards/``, or ``pool.metadata_uri`` / ``pool.shards_uri``) or a directory of
winnow's per-shard ``{n:08d}.parquet/.npz/.tar``. Nothing is copied: the manifest points at it."""
import sys

from winnow import io as wio
from winnow.config import Params
from winnow.io import atomic_dir, write_json
from winnow.demo import pool as demo
from winnow.pool import checks, datacomp, shards, verified
from winnow.pool.view import Pool
from winnow.stage import main
from winnow.validate import Gate

OUT = "data/pool"


def _absolute(uri: str | None) -> str | None:
    return uri if uri is None or wio.is_remote(uri) else str(wio.local(uri).resolve())


def external_manifest(p) -> dict:
    """The manifest of an existing pool: its layout, shards and (download layout) the image join."""
    if p.metadata_uri or p.shards_uri or datacomp.is_download_dir(p.uri):
        meta_uri, img_uri = map(_absolute, datacomp.locate(p.uri, p.metadata_uri, p.shards_uri))
        stems = datacomp.metadata_files(meta_uri)
        joined = datacomp.join(meta_uri, stems, img_uri)
        return {"source": "datacomp", "layout": "download", "uri": meta_uri, "shards": stems,
                "num_shards": len(stems), "images_uri": img_uri, "image_shards": joined["image_shards"],
                "images": joined["by_file"], "download": joined["counts"]}
    found = shards.discover(p.uri)
    if "status" in shards.read_meta(p.uri, found[0]).column_names:   # img2dataset's records, not metadata
        raise shards.ShardError(
            f"{p.uri} holds img2dataset's shards (record parquets with 'status'), not the pool's metadata: set "
            "pool.uri to the download's --data_dir (the folder with metadata/ and shards/), or pool.metadata_uri "
            "and pool.shards_uri")
    return {"source": "datacomp", "layout": "shards", "uri": _absolute(p.uri), "shards": found,
            "num_shards": len(found)}


def body(p: Params) -> dict:
    if p.pool.source == "demo":
        summary = demo.write_pool(p.pool, p.seed, OUT)
    else:   # an external pool: nothing is copied, the manifest points at it
        summary = external_manifest(p.pool)
        with atomic_dir(OUT) as tmp:
            write_json(tmp / "manifest.json", summary)
    gate = Gate("pool")
    pool = Pool.open(OUT)
    stats = checks.check_pool(pool, gate, max_unreadable_tars=p.pool.max_unreadable_tars,
                              min_image_fraction=p.pool.min_downloaded if pool.is_download else 0.8)
    gate.finish()
    verified.record(pool)   # the filter's probe need not read every shard's uids again
    out = {"num_shards": summary["num_shards"], **stats}
    if pool.is_download:
        c = summary["download"]
        out.update(attempted=c["attempted"], downloaded=c["downloaded"], failed_downloads=c["failed"],
                   not_attempted=c["not_attempted"], image_shards=len(summary["image_shards"]),
                   duplicate_downloads=c["duplicate_downloads"], tars_without_record=c["tars_without_record"],
                   unfinished_shards=c["unfinished_shards"])
        for kind, what in (("tars_without_record", "image tar(s) have no img2dataset record parquet (an "
                                                   "unfinished download shard)"),
                           ("unfinished_shards", "image shard(s) were left unfinished by a killed download "
                                                 "(a record parquet without its footer, and no _stats.json)")):
            if c[kind]:   # their images are not in the pool: say which, not only how many
                print(f"winnow pool: {c[kind]} {what}, their samples count as not downloaded: "
                      f"{c[kind + '_examples']}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main("pool", body)
