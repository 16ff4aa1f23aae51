"""The DataComp pool fixture: metadata as DataComp ships it, shards as the real img2dataset writes them."""

import io
import json
import math
import re
import tarfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tests.fixtures import datacomp_pool as fixture_module
from tests.fixtures.datacomp_pool import build_datacomp_pool

HEX32 = re.compile(r"^[0-9a-f]{32}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
NINE = {
    "uid": pa.string(), "url": pa.string(), "text": pa.string(),
    "original_width": pa.int64(), "original_height": pa.int64(),
    "clip_b32_similarity_score": pa.float32(), "clip_l14_similarity_score": pa.float32(),
    "face_bboxes": pa.list_(pa.list_(pa.float64())), "sha256": pa.string(),
}
I2D_COLUMNS = ["uid", "face_bboxes", "caption", "url", "key", "status", "error_message", "width", "height",
               "original_width", "original_height", "exif", "sha256"]


def _shard_plan(pool):
    """(shard id, metadata stem, first row, last row) as img2dataset assigns them: metadata files in
    sorted name order, each cut into ceil(rows / samples_per_shard) shards, never across files."""
    spp = pool["samples_per_shard"]
    counts = {stem: len(u) for stem, u in zip(pool["metadata_files"], pool["uids"])}
    plan, n = [], 0
    for stem in sorted(counts):
        for k in range(math.ceil(counts[stem] / spp)):
            plan.append((n, stem, k * spp, min(counts[stem], (k + 1) * spp)))
            n += 1
    return plan


def _i2d(pool) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p).assign(shard=int(p.stem))
                      for p in sorted(pool["shards_dir"].glob("*.parquet"))], ignore_index=True)


def test_metadata_files_are_hash_named_and_not_in_creation_order(datacomp_pool):
    md = datacomp_pool["metadata_dir"]
    names = datacomp_pool["metadata_files"]
    assert len(names) == 3 and all(HEX32.match(n) for n in names)
    assert sorted(names) != names
    assert sorted(p.name for p in md.iterdir()) == sorted([f"{n}.parquet" for n in names] + [f"{n}.npz" for n in names])


def test_metadata_parquet_has_datacomps_nine_columns(datacomp_pool):
    table = datacomp_pool["table"]
    all_uids = []
    for stem, uids in zip(datacomp_pool["metadata_files"], datacomp_pool["uids"]):
        path = datacomp_pool["metadata_dir"] / f"{stem}.parquet"
        schema = pq.read_schema(path)
        assert schema.names == list(NINE)
        for name, typ in NINE.items():
            assert schema.field(name).type == typ, name
        df = pd.read_parquet(path)
        assert df.uid.tolist() == uids and len(df) == 120
        assert all(HEX32.match(u) for u in df.uid) and all(HEX64.match(s) for s in df.sha256)
        assert df.url.str.match(r"^http://127\.0\.0\.1:\d+/img/\d+\.(jpg|png)$").all()
        mine = table[table.file == stem].reset_index(drop=True)
        for col in ["uid", "url", "text", "original_width", "original_height", "sha256"]:
            assert df[col].tolist() == mine[col].tolist(), col
        assert df.clip_b32_similarity_score.between(-1, 1).all() and df.clip_l14_similarity_score.between(-1, 1).all()
        for boxes in df.face_bboxes:
            for b in boxes:
                assert len(b) == 4 and all(0 <= v <= 1 for v in b) and b[0] < b[2] and b[1] < b[3]
        all_uids += uids
    assert len(set(all_uids)) == len(all_uids) == 360


def test_metadata_gives_datacomps_rules_work(datacomp_pool):
    t = datacomp_pool["table"]
    lo = np.minimum(t.original_width, t.original_height)
    hi = np.maximum(t.original_width, t.original_height)
    assert (lo < 200).sum() >= 10                                   # too small
    assert ((lo >= 200) & (hi / lo > 3)).sum() >= 10                # extreme aspect only
    assert ((lo >= 200) & (hi / lo <= 3)).mean() > 0.6              # most pass the image rule
    words = t.text.str.split().str.len()
    assert (words <= 2).sum() >= 10 and (t.caption_kind == "non_english").sum() >= 10
    assert t.text.str.contains(r"\s\s|\t|\n").sum() >= 10           # odd whitespace
    assert t.clip_b32_similarity_score.duplicated().sum() >= 10     # exact ties
    assert t.clip_l14_similarity_score.duplicated().sum() >= 10
    assert (t.face_bboxes.str.len() > 0).sum() >= 20 and (t.face_bboxes.str.len() == 0).mean() > 0.7
    assert t.sha256.duplicated().sum() >= 2                         # byte-identical images


def test_npz_keys_dims_and_rows_align_with_parquet(datacomp_pool):
    for stem in datacomp_pool["metadata_files"]:
        df = pd.read_parquet(datacomp_pool["metadata_dir"] / f"{stem}.parquet")
        with np.load(datacomp_pool["metadata_dir"] / f"{stem}.npz") as z:
            assert sorted(z.files) == ["b32_img", "b32_txt", "l14_img", "l14_txt"]
            for key, dim in {"b32_img": 512, "b32_txt": 512, "l14_img": 768, "l14_txt": 768}.items():
                assert z[key].dtype == np.float16 and z[key].shape == (len(df), dim), key
                np.testing.assert_allclose(np.linalg.norm(z[key].astype(np.float32), axis=1), 1, atol=5e-3)
            # rows aligned: each row's image/text similarity is that row's CLIP score
            for arch in ("b32", "l14"):
                sim = (z[f"{arch}_img"].astype(np.float32) * z[f"{arch}_txt"].astype(np.float32)).sum(1)
                np.testing.assert_allclose(sim, df[f"clip_{arch}_similarity_score"], atol=5e-3)


def test_shards_dir_is_img2datasets_layout(datacomp_pool):
    plan = _shard_plan(datacomp_pool)
    assert len(plan) == 9
    names = sorted(p.name for p in datacomp_pool["shards_dir"].iterdir())
    assert names == sorted(f"{n:08d}{ext}" for n, *_ in plan for ext in (".tar", ".parquet", "_stats.json"))


def test_img2dataset_parquet_one_row_per_url_in_metadata_order(datacomp_pool):
    table = datacomp_pool["table"]
    i2d = _i2d(datacomp_pool)
    for n, stem, lo, hi in _shard_plan(datacomp_pool):
        shard = pd.read_parquet(datacomp_pool["shards_dir"] / f"{n:08d}.parquet")
        assert shard.columns.tolist() == I2D_COLUMNS
        assert set(shard.status) <= {"success", "failed_to_download", "failed_to_resize"}
        # rows are in download-completion order; the key is shard id * 10**ceil(log10(50)) + row in shard
        shard = shard.sort_values("key").reset_index(drop=True)
        assert shard.key.tolist() == [f"{n * 100 + i:010d}" for i in range(hi - lo)]
        meta = table[table.file == stem].iloc[lo:hi].reset_index(drop=True)
        assert shard.uid.tolist() == meta.uid.tolist()          # one shard never spans two files
        assert shard.caption.tolist() == meta.text.tolist() and shard.url.tolist() == meta.url.tolist()
        assert [list(map(list, b)) for b in shard.face_bboxes] == meta.face_bboxes.tolist()
    ok = i2d[i2d.status == "success"].merge(table, on="uid", suffixes=("", "_meta"))
    assert len(ok) == len(datacomp_pool["downloaded"])
    # img2dataset decodes the served bytes: metadata sizes and hashes are the real ones
    assert (ok.original_width == ok.original_width_meta).all() and (ok.original_height == ok.original_height_meta).all()
    assert (ok.sha256 == ok.sha256_meta).all()
    side = datacomp_pool["image_side"]
    big = np.maximum(ok.original_width, ok.original_height) > side
    assert (np.maximum(ok.width, ok.height)[big] == side).all()                    # keep_ratio_largest
    assert ((ok.width == ok.original_width) & (ok.height == ok.original_height))[~big].all() and (~big).any()
    bad = i2d[i2d.status != "success"]
    assert bad.width.isna().all() and bad.sha256.isna().all() and bad.error_message.notna().all()


def test_tar_members_and_json(datacomp_pool):
    table = datacomp_pool["table"].set_index("uid")
    i2d = _i2d(datacomp_pool).set_index("key")
    seen = set()
    for n, *_ in _shard_plan(datacomp_pool):
        with tarfile.open(datacomp_pool["shards_dir"] / f"{n:08d}.tar") as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        keys = {name.split(".")[0] for name in members}
        assert set(members) == {f"{k}.{ext}" for k in keys for ext in ("jpg", "txt", "json")}
        for key in keys:
            meta = json.loads(members[f"{key}.json"])
            assert set(meta) == set(I2D_COLUMNS)
            assert meta["key"] == key and meta["status"] == "success" and key.startswith(f"{n:08d}")
            assert i2d.loc[key, "uid"] == meta["uid"]
            assert members[f"{key}.txt"].decode() == table.loc[meta["uid"], "text"] == meta["caption"]
            img = Image.open(io.BytesIO(members[f"{key}.jpg"]))
            assert img.format == "JPEG" and img.size == (meta["width"], meta["height"])
            seen.add(meta["uid"])
    assert seen == datacomp_pool["downloaded"]


def test_downloaded_and_failed_sets(datacomp_pool):
    i2d = _i2d(datacomp_pool)
    table = datacomp_pool["table"]
    everything = set(table.uid)
    assert datacomp_pool["downloaded"] == set(i2d.uid[i2d.status == "success"])
    assert datacomp_pool["failed"] == set(i2d.uid[i2d.status != "success"])
    assert datacomp_pool["downloaded"] | datacomp_pool["failed"] == everything == set(i2d.uid)
    assert not datacomp_pool["downloaded"] & datacomp_pool["failed"]
    dead, html = datacomp_pool["dead"], datacomp_pool["non_image"]
    assert len(dead) == round(0.15 * 360) and len(html) == round(0.05 * 360)
    by_uid = i2d.set_index("uid")
    assert (by_uid.loc[list(dead), "status"] == "failed_to_download").all()
    assert (by_uid.loc[list(dead), "error_message"] == "HTTP Error 404: Not Found").all()
    assert (by_uid.loc[list(html), "status"] == "failed_to_resize").all()        # 200 + HTML: decode fails
    assert (by_uid.loc[list(html), "error_message"] == "Image decoding error").all()
    assert datacomp_pool["failed"] == dead | html
    assert datacomp_pool["status"] == dict(zip(i2d.uid, i2d.status))


def test_stats_json_counts(datacomp_pool):
    i2d = _i2d(datacomp_pool)
    for n, *_ in _shard_plan(datacomp_pool):
        stats = json.loads((datacomp_pool["shards_dir"] / f"{n:08d}_stats.json").read_text())
        assert set(stats) == {"count", "successes", "failed_to_download", "failed_to_resize", "duration",
                              "start_time", "end_time", "status_dict"}
        s = i2d[i2d.shard == n]
        assert stats["count"] == len(s)
        assert stats["successes"] == (s.status == "success").sum() == stats["status_dict"].get("success", 0)
        assert stats["failed_to_download"] == (s.status == "failed_to_download").sum()
        assert stats["failed_to_resize"] == (s.status == "failed_to_resize").sum()
        assert sum(stats["status_dict"].values()) == stats["count"]


def test_metadata_is_deterministic(tmp_path, monkeypatch):
    """Same seed, same metadata (images, captions, scores, embeddings); another seed differs. The
    download is skipped here: only the generation is under test."""
    monkeypatch.setattr(fixture_module, "_run_img2dataset", lambda *a, **k: (0.0, "-", ""))
    kw = dict(files=2, rows_per_file=30, samples_per_shard=10)
    a, b = (build_datacomp_pool(tmp_path / name, **kw) for name in ("a", "b"))
    c = build_datacomp_pool(tmp_path / "c", seed=1, **kw)
    assert a["metadata_files"] == b["metadata_files"] != c["metadata_files"]
    drop = ["url", "face_bboxes"]
    pd.testing.assert_frame_equal(a["table"].drop(columns=drop), b["table"].drop(columns=drop))
    assert a["table"].face_bboxes.tolist() == b["table"].face_bboxes.tolist()
    assert a["uids"] != c["uids"]
    for stem in a["metadata_files"]:
        with np.load(a["metadata_dir"] / f"{stem}.npz") as za, np.load(b["metadata_dir"] / f"{stem}.npz") as zb:
            for k in za.files:
                np.testing.assert_array_equal(za[k], zb[k])
