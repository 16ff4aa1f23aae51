"""winnow.s3 against a real S3-compatible server (SeaweedFS on 127.0.0.1): transfers, atomic
uploads, clear errors, scorer weights by s3:// URI, and no credential in what we write."""
import os

import pytest
import torch

from tests.s3server import BUCKET, SECRET_KEY
from winnow import models, s3


def test_roundtrip_listing_and_atomic_upload(s3_server, tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(3 * 2**20))
    uri = f"s3://{BUCKET}/t1/a.bin"
    s3.upload(src, uri)
    assert s3.exists(uri) and not s3.exists(f"s3://{BUCKET}/t1/nope")
    assert s3.read_bytes(uri) == src.read_bytes()
    assert s3.list_names(f"s3://{BUCKET}/t1") == ["a.bin"]          # no temporary key left behind
    with s3.open_stream(uri) as body:
        assert body.read(10) == src.read_bytes()[:10]
    dest = s3.download(uri, tmp_path / "back" / "a.bin")
    assert dest.read_bytes() == src.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["a.bin"]


def test_errors_name_the_object_not_the_credentials(s3_server, tmp_path):
    with pytest.raises(s3.S3Error, match=f"s3://{BUCKET}/missing/x.pt") as e:
        s3.read_bytes(f"s3://{BUCKET}/missing/x.pt")
    assert SECRET_KEY not in str(e.value)
    with pytest.raises(s3.S3Error):
        s3.download(f"s3://{BUCKET}/missing/x.pt", tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_scorer_weights_from_s3(s3_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # the download cache is .winnow/cache under the project
    torch.manual_seed(0)
    m, _, _ = models.load("winnow-tiny", None)
    torch.save({"state_dict": m.state_dict()}, tmp_path / "ckpt.pt")
    s3.upload(tmp_path / "ckpt.pt", f"s3://{BUCKET}/scorers/dfn.pt")
    loaded, _, _ = models.load("winnow-tiny", f"s3://{BUCKET}/scorers/dfn.pt")
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert (tmp_path / ".winnow/cache/s3" / BUCKET / "scorers/dfn.pt").exists()
    with pytest.raises(models.ModelError, match="cannot be fetched"):
        models.load("winnow-tiny", f"s3://{BUCKET}/scorers/absent.pt")


def test_a_stopped_server_is_a_clear_failure_after_retries(tmp_path, monkeypatch):
    from tests.s3server import S3Server

    server = S3Server(tmp_path / "s3").start()
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("WINNOW_S3_MAX_ATTEMPTS", "3")
    s3.client.cache_clear()
    try:
        (tmp_path / "f").write_bytes(b"x" * 1000)
        s3.upload(tmp_path / "f", f"s3://{BUCKET}/f")
        server.stop()
        with pytest.raises(s3.S3Error, match="cannot download"):
            s3.download(f"s3://{BUCKET}/f", tmp_path / "out" / "f")
        assert not (tmp_path / "out" / "f").exists()          # nothing half-written
    finally:
        server.stop()
        s3.client.cache_clear()


def _upload_dir(src, uri):
    for p in sorted(src.iterdir()):
        if p.is_file():
            s3.upload(p, f"{uri}/{p.name}")


def test_a_pool_on_s3_filters_and_streams_like_the_local_one(s3_server, demo_pool, tmp_path):
    import numpy as np

    from winnow.filters.engine import load_recipe, run
    from winnow.pool import shards
    from winnow.pool.view import Pool

    uri = f"s3://{BUCKET}/pools/demo"
    _upload_dir(demo_pool, uri)
    remote, here = Pool.open(uri), Pool.open(str(demo_pool))
    assert remote.shards == here.shards and remote.uri == uri
    assert shards.discover(uri) == here.shards
    for recipe in ("basic", "clip_b32_top30"):
        a = run(load_recipe(recipe), remote, str(tmp_path / f"s3-{recipe}"))
        b = run(load_recipe(recipe), here, str(tmp_path / f"local-{recipe}"))
        assert (tmp_path / f"s3-{recipe}/uids.npy").read_bytes() == (tmp_path / f"local-{recipe}/uids.npy").read_bytes()
        timeless = [[{k: v for k, v in step.items() if k != "seconds"} for step in f["steps"]] for f in (a, b)]
        assert timeless[0] == timeless[1]
    # tars stream from the server: the same samples, in order
    remote_samples = list(shards.iter_tar(uri, "00000001"))
    local_samples = list(shards.iter_tar(str(demo_pool), "00000001"))
    assert [s["__key__"] for s in remote_samples] == [s["__key__"] for s in local_samples]
    assert all(x["jpg"] == y["jpg"] for x, y in zip(remote_samples, local_samples))
    np.testing.assert_array_equal(remote.batch("00000002").embedding("b32_img"), here.batch("00000002").embedding("b32_img"))


def test_a_truncated_tar_on_s3_is_named(s3_server, demo_pool, tmp_path):
    from winnow.pool import shards

    uri = f"s3://{BUCKET}/pools/truncated"
    data = (demo_pool / "00000000.tar").read_bytes()
    (tmp_path / "00000000.tar").write_bytes(data[: len(data) // 2])
    s3.upload(tmp_path / "00000000.tar", f"{uri}/00000000.tar")
    with pytest.raises(shards.ShardError, match=f"shard 00000000: tar {uri}/00000000.tar is"):
        list(shards.iter_tar(uri, "00000000"))
    with pytest.raises(shards.ShardError, match="missing"):
        list(shards.iter_tar(uri, "00000009"))

# publishing: tests/test_publish.py
