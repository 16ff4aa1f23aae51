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
