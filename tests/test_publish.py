"""Publishing to S3 (a real SeaweedFS server on 127.0.0.1): immutable versions behind a pointer
written last, readers that verify every byte, and nothing deleted that winnow's own manifests do
not list."""
import json
import os
import threading

import pytest
import yaml

from tests.s3server import BUCKET, SECRET_KEY
from winnow import publish, s3


def _write(out, files: dict):
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)


def _keys(prefix):
    return s3.list_keys(f"s3://{BUCKET}/{prefix}")


def test_versions_behind_a_pointer_and_verified_reads(s3_server, tmp_path):
    out = tmp_path / "subset"
    out.mkdir()
    v1 = {"a.tar": os.urandom(2000), "b.tar": os.urandom(3000), "deep/c.json": b'{"x": 1}'}
    _write(out, v1)
    uri = f"s3://{BUCKET}/pub1/data/subset"
    r1 = publish.publish_output(out, uri)
    assert publish.is_complete(uri)
    pub = publish.verify(uri)
    assert pub.version == r1["version"] and sorted(pub.files) == sorted(v1)
    assert all(publish.read_published(uri, n) == d for n, d in v1.items())
    # a new version without b.tar: the pointer names only the new files; the old version stays for
    # readers that resolved it a moment ago, until the next publish retires it
    (out / "b.tar").unlink()
    (out / "a.tar").write_bytes(b"new")
    r2 = publish.publish_output(out, uri)
    assert sorted(publish.resolve(uri).files) == ["a.tar", "deep/c.json"]
    assert publish.read_published(uri, "a.tar") == b"new"
    with pytest.raises(publish.PublishError, match="not in the published version"):
        publish.read_published(uri, "b.tar")
    versions = {k.split("/")[1] for k in _keys("pub1/data/subset") if k.startswith("_v/")}
    assert versions == {r1["version"], r2["version"]}
    r3 = publish.publish_output(out, uri)
    versions = {k.split("/")[1] for k in _keys("pub1/data/subset") if k.startswith("_v/")}
    assert versions == {r2["version"], r3["version"]}          # the first one retired, by its manifest
    assert not [k for k in _keys("pub1") if k.endswith(".tmp") or ".tmp/" in k]
    # the local copy through the pointer (what io.cache_local does for a published prefix)
    dest = publish.download_output(uri, tmp_path / "copy")
    assert (dest / "a.tar").read_bytes() == b"new" and (dest / "deep/c.json").read_bytes() == v1["deep/c.json"]


def test_publishing_never_deletes_keys_winnow_did_not_write(s3_server, tmp_path):
    """Today's main removed every key under the prefix that the local output lacked: a pool (or
    anything) stored there was wiped by the first publish."""
    uri = f"s3://{BUCKET}/pub2/data/pool"
    foreign = {"00000000.tar": b"someone's shard", "00000000.parquet": b"their metadata"}
    for name, data in foreign.items():
        s3.client().put_object(Bucket=BUCKET, Key=f"pub2/data/pool/{name}", Body=data)
    out = tmp_path / "pool"
    out.mkdir()
    _write(out, {"manifest.json": b"{}"})
    for _ in range(3):
        publish.publish_output(out, uri)
    for name, data in foreign.items():
        assert s3.read_bytes(f"{uri}/{name}") == data
    assert publish.read_published(uri, "manifest.json") == b"{}"


def test_a_storage_prefix_overlapping_an_input_is_refused(s3_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/pool").mkdir(parents=True)
    (tmp_path / "data/pool/manifest.json").write_text("{}")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"pool": {"cmd": "x", "outs": ["data/pool"]}}}))
    storage = f"s3://{BUCKET}/pub3"
    for pool_uri in (f"{storage}/data/pool", storage, f"s3://{BUCKET}"):
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"pool": {"uri": pool_uri}, "storage": {"uri": storage}}))
        with pytest.raises(publish.OverlapError, match="overlaps the input"):
            publish.publish_stage("pool", storage)
    assert _keys("pub3") == []
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"pool": {"uri": f"s3://{BUCKET}/pools/x"},
                                                           "storage": {"uri": storage}}))
    assert publish.publish_stage("pool", storage)[0]["files"] == 1
    assert publish.overlaps("s3://b/a/b", "s3://b/a") and not publish.overlaps("s3://b/ab", "s3://b/a")
    assert not publish.overlaps("s3://b/a", "s3://c/a")


def test_a_pointer_that_is_not_winnows_is_refused(s3_server, tmp_path):
    uri = f"s3://{BUCKET}/pub4/out"
    s3.client().put_object(Bucket=BUCKET, Key="pub4/out/_SUCCESS.json", Body=b"spark was here")
    out = tmp_path / "o"
    out.mkdir()
    _write(out, {"a": b"1"})
    with pytest.raises(publish.PublishError, match="not winnow's manifest"):
        publish.publish_output(out, uri)
    assert s3.read_bytes(f"{uri}/_SUCCESS.json") == b"spark was here" and _keys("pub4/out") == ["_SUCCESS.json"]


def test_a_failed_publish_leaves_the_previous_version_whole(s3_server, tmp_path, monkeypatch):
    uri = f"s3://{BUCKET}/pub5/out"
    out = tmp_path / "o"
    out.mkdir()
    _write(out, {"a.tar": b"A1", "b.tar": b"B1"})
    r1 = publish.publish_output(out, uri)
    _write(out, {"a.tar": b"A2", "b.tar": b"B2", "c.tar": b"C2"})
    real, calls = s3.upload_raw, {"n": 0}

    def failing(src, dest, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise s3.S3Error("injected failure")
        return real(src, dest, *a, **k)

    monkeypatch.setattr(s3, "upload_raw", failing)
    with pytest.raises(s3.S3Error, match="injected"):
        publish.publish_output(out, uri)
    assert publish.resolve(uri).version == r1["version"] and publish.is_complete(uri)
    assert publish.read_published(uri, "a.tar") == b"A1" and publish.read_published(uri, "b.tar") == b"B1"
    assert {k.split("/")[1] for k in _keys("pub5/out") if k.startswith("_v/")} == {r1["version"]}


def test_readers_detect_bytes_that_differ_from_the_manifest(s3_server, tmp_path, monkeypatch):
    from winnow import io as wio

    uri = f"s3://{BUCKET}/pub6/out"
    out = tmp_path / "o"
    out.mkdir()
    _write(out, {"a.tar": b"A" * 100, "b.tar": b"B" * 100})
    publish.publish_output(out, uri)
    pub = publish.resolve(uri)
    s3.client().put_object(Bucket=BUCKET, Key=f"pub6/out/{pub.prefix}/a.tar", Body=b"X" * 100)   # same size
    with pytest.raises(publish.IntegrityError, match="differ"):
        publish.read_published(uri, "a.tar")
    with pytest.raises(publish.IntegrityError, match="differ"):
        publish.download_output(uri, tmp_path / "copy")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(publish.IntegrityError):
        wio.cache_local(uri)                      # io's reader of remote directories goes through the pointer
    s3.client().delete_object(Bucket=BUCKET, Key=f"pub6/out/{pub.prefix}/b.tar")
    with pytest.raises(publish.IntegrityError, match="missing"):
        publish.verify(uri)
    assert not publish.is_complete(uri)


def test_concurrent_publishers_leave_a_pointer_that_describes_its_bytes(s3_server, tmp_path):
    """Today's main interleaved two publishers' copies and manifests: the manifest described other
    bytes. Versions are disjoint and the pointer is one conditional PUT, so every pointer matches."""
    uri = f"s3://{BUCKET}/pub7/out"
    contents = {}
    for who in ("x", "y"):
        d = tmp_path / who
        d.mkdir()
        contents[who] = {f"{i}.tar": f"{who}{i}".encode() * 500 for i in range(6)}
        _write(d, contents[who])
    errors, seen = [], []

    def publisher(who):
        try:
            for _ in range(4):
                publish.publish_output(tmp_path / who, uri)
        except Exception as exc:     # pragma: no cover - reported below
            errors.append(repr(exc))

    def reader(stop):
        while not stop.is_set():
            try:
                pub = publish.resolve(uri)
                got = {n: pub.read(n) for n in pub.files}     # one version, every file checked
                seen.append(got)
            except publish.PublishError:
                pass        # no pointer yet, or a version retired mid-read ("read again"): never wrong bytes

    stop = threading.Event()
    threads = [threading.Thread(target=publisher, args=(w,)) for w in ("x", "y")]
    rt = threading.Thread(target=reader, args=(stop,))
    rt.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    rt.join()
    assert not errors, errors
    final = {n: publish.read_published(uri, n) for n in publish.verify(uri).files}
    assert final in (contents["x"], contents["y"])
    assert all(s in (contents["x"], contents["y"]) for s in seen)       # a reader never saw a mix
    versions = {k.split("/")[1] for k in _keys("pub7/out") if k.startswith("_v/")}
    assert len(versions) <= 3          # current, previous, at most one that lost a race (swept later)


def test_published_files_carry_their_hash_and_foreign_objects_are_not_overwritten(s3_server, tmp_path):
    f = tmp_path / "summary.json"
    f.write_text('{"avg": 0.5}')
    uri = f"s3://{BUCKET}/pub8/reports/eval/summary.json"
    publish.publish_output(f, uri)
    assert publish.read_published(uri) == f.read_bytes() and publish.is_complete(uri)
    f.write_text('{"avg": 0.6}')
    publish.publish_output(f, uri)                               # winnow's own object: replaced
    assert publish.read_published(uri) == b'{"avg": 0.6}'
    s3.client().put_object(Bucket=BUCKET, Key="pub8/reports/eval/theirs.json", Body=b"keep me")
    with pytest.raises(publish.PublishError, match="not published by winnow"):
        publish.publish_output(f, f"s3://{BUCKET}/pub8/reports/eval/theirs.json")
    assert s3.read_bytes(f"s3://{BUCKET}/pub8/reports/eval/theirs.json") == b"keep me"


def test_leftovers_of_a_killed_publisher_are_swept(s3_server, tmp_path):
    """A SIGKILLed publisher leaves temporary keys, multipart uploads and an unpointed version; the
    next publish removes them once their writer is gone (dead pid here; a day old elsewhere)."""
    import subprocess

    from winnow.io import HOST

    dead = subprocess.Popen(["true"])
    dead.wait()
    owner = f"{HOST}-{dead.pid}"
    c = s3.client()
    c.put_object(Bucket=BUCKET, Key=f"pub9/out/a.tar.{owner}-0123456789ab.tmp", Body=b"half")
    mp_key = f"pub9/out/b.tar.{owner}-ba9876543210.tmp"
    c.create_multipart_upload(Bucket=BUCKET, Key=mp_key)
    live_key = f"pub9/out/c.tar.{HOST}-{os.getpid()}-aaaaaaaaaaaa.tmp"      # a writer still running: kept
    c.put_object(Bucket=BUCKET, Key=live_key, Body=b"mine")
    orphan = "20000101T000000000000Z-deadbeef"
    c.put_object(Bucket=BUCKET, Key=f"pub9/out/_v/{orphan}/_MANIFEST.json", Body=json.dumps(
        {"format": publish.FORMAT, "version": orphan, "files": {"x.tar": {"size": 4, "sha256": "0" * 64}}}).encode())
    c.put_object(Bucket=BUCKET, Key=f"pub9/out/_v/{orphan}/x.tar", Body=b"xxxx")
    out = tmp_path / "o"
    out.mkdir()
    _write(out, {"a.tar": b"A"})
    r = publish.publish_output(out, f"s3://{BUCKET}/pub9/out", grace_s=0)
    keys = _keys("pub9/out")
    assert live_key[len("pub9/out/"):] in keys
    assert sorted(k for k in keys if k != live_key[len("pub9/out/"):]) == sorted(
        ["_SUCCESS.json", f"_v/{r['version']}/_MANIFEST.json", f"_v/{r['version']}/a.tar"])
    uploads = c.list_multipart_uploads(Bucket=BUCKET, Prefix="pub9/").get("Uploads", [])
    assert not [u for u in uploads if u["Key"] == mp_key]


def test_an_upload_that_fails_aborts_its_multipart_upload_and_temporary_key(s3_server, tmp_path, monkeypatch):
    from boto3.s3.transfer import TransferConfig

    monkeypatch.setattr(s3, "_transfer_config", lambda: TransferConfig(multipart_threshold=5 * 2**20,
                                                                       multipart_chunksize=5 * 2**20))
    src = tmp_path / "big"
    src.write_bytes(os.urandom(11 * 2**20))
    real = s3.client().upload_part
    calls = {"n": 0}

    def failing_part(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise s3_server_error()
        return real(*a, **k)

    monkeypatch.setattr(s3.client(), "upload_part", failing_part)
    with pytest.raises(s3.S3Error):
        s3.upload(src, f"s3://{BUCKET}/pub10/big")
    assert _keys("pub10") == []
    assert not s3.client().list_multipart_uploads(Bucket=BUCKET, Prefix="pub10/").get("Uploads")


def s3_server_error():
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": "InternalError", "Message": "injected"}}, "UploadPart")


def test_boto_errors_from_publish_are_scrubbed(s3_server, tmp_path, monkeypatch):
    """A botocore error raised by publish carries URLs with credentials (a presigned URL, an
    endpoint with userinfo): it surfaces as S3Error with every secret masked."""
    from botocore.exceptions import ClientError

    from winnow import track

    leak = (f"https://AKIAXX:{SECRET_KEY}/x@{'h'}.example.com/k?X-Amz-Credential=AKIAXX%2F1&"
            f"X-Amz-Signature={SECRET_KEY}sig")

    def boom(*a, **k):
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": f"denied for {leak}"}}, "PutObject")

    monkeypatch.setattr(s3.client(), "put_object", boom)
    out = tmp_path / "o"
    out.mkdir()
    _write(out, {"a": b"1"})
    with pytest.raises(s3.S3Error) as e:
        publish.publish_output(out, f"s3://{BUCKET}/pub11/out")
    assert SECRET_KEY not in str(e.value) and "AccessDenied" in str(e.value)
    assert SECRET_KEY not in track.scrub(leak)


def test_an_experiment_publishes_under_its_own_prefix(tmp_path):
    """After a sweep the workspace's published outputs are still those its dvc.lock names: each
    `dvc exp run` point publishes under exps/<name>."""
    from winnow.publish import storage_prefix

    (tmp_path / "params.yaml").write_text("seed: 1\n")
    assert storage_prefix("s3://b/run", env={}) == "s3://b/run"
    assert storage_prefix("s3://b/run/", env={"DVC_EXP_BASELINE_REV": "abc", "DVC_EXP_NAME": "basic-s0"}) == "s3://b/run/exps/basic-s0"
    unnamed = storage_prefix("s3://b/run", env={"DVC_EXP_BASELINE_REV": "abc"}, params_yaml=tmp_path / "params.yaml")
    hostile = storage_prefix("s3://b/run", env={"DVC_EXP_BASELINE_REV": "abc", "DVC_EXP_NAME": "../../x"},
                             params_yaml=tmp_path / "params.yaml")
    assert unnamed == hostile and unnamed.startswith("s3://b/run/exps/exp-") and ".." not in hostile
