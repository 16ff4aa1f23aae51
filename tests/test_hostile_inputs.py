"""Hostile inputs found by the second security review: each ends in a named error or a counted
quarantine, never a raw traceback, a hang, unbounded memory or a leaked credential."""
import io
import json
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT, env_for_subprocess


def _tar(path, members, fmt=tarfile.USTAR_FORMAT, pax=None):
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if pax and name == members[0][0]:
                info.pax_headers = pax
            tf.addfile(info, io.BytesIO(data))
    return path


def _image(fmt: str, size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, fmt)
    return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR declares width x height (the CRC is not checked before the size is)."""
    import zlib

    data = bytearray(_image("PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[ihdr + 17: ihdr + 21] = zlib.crc32(bytes(data[ihdr: ihdr + 17])).to_bytes(4, "big")
    return bytes(data)


# --- pool tars -------------------------------------------------------------------------------------

@pytest.mark.parametrize("payload", [b'{"uid": ["a"]}', b'{"uid": {"a": 1}}', b'{"uid": 5}',
                                     b'{"uid": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"],
                         ids=["list", "object", "number", "deep"])
def test_a_pool_json_whose_uid_is_not_text_reads_as_a_sample_without_uid(tmp_path, payload):
    """A list or object uid reached set and dict lookups (TypeError: unhashable) in the pool gate,
    embed and the report; JSON nested 200,000 deep raised RecursionError through every tar reader."""
    from winnow.pool import shards

    _tar(tmp_path / "00000000.tar", [("a.jpg", _image("JPEG")), ("a.txt", b"a cat"), ("a.json", payload),
                                     ("b.jpg", _image("JPEG")), ("b.json", b'{"uid": "0123456789abcdef0123456789abcdef"}')])
    samples = list(shards.iter_tar(str(tmp_path), "00000000"))
    assert [s["__key__"] for s in samples] == ["a", "b"]
    assert "uid" not in samples[0]["json"]                      # counted by readers as a sample without uid
    assert samples[1]["json"]["uid"] == "0123456789abcdef0123456789abcdef"


def test_an_extended_tar_header_above_the_cap_is_a_corrupt_tar_not_memory(tmp_path, monkeypatch):
    """tarfile reads a pax record whole before any member-size check: a 5-byte member could bring a
    300 MB header into memory. Every tar reader (pool, evaluation sets, training shards) refuses it
    as a corrupt tar; an ordinary pax header still reads."""
    from winnow import decode, tasks, train
    from winnow.pool import shards

    monkeypatch.setattr(decode, "MAX_HEADER_BYTES", 4096)
    ok = _tar(tmp_path / "00000000.tar", [("a.txt", b"hello"), ("a.jpg", _image("JPEG"))], tarfile.PAX_FORMAT,
              {"comment": "x" * 100})
    assert [s["txt"] for s in shards.iter_tar(str(tmp_path), "00000000")] == ["hello"]
    _tar(tmp_path / "00000001.tar", [("a.txt", b"hello"), ("a.jpg", _image("JPEG"))], tarfile.PAX_FORMAT,
         {"comment": "x" * 10_000})
    with pytest.raises(shards.ShardError, match="above the cap"):
        list(shards.iter_tar(str(tmp_path), "00000001"))
    with pytest.raises(tasks.MissingTask, match="above the cap"):
        list(tasks.iter_tar(tmp_path / "00000001.tar"))
    assert "above the cap" in train._scan(tmp_path / "00000001.tar", None, decode.MAX_PIXELS, decode.MAX_MEMBER_BYTES)["error"]
    long_name = _tar(tmp_path / "long.tar", [("d" * 5000 + ".txt", b"x")], tarfile.GNU_FORMAT)
    with pytest.raises(tasks.MissingTask, match="above the cap"):
        list(tasks.iter_tar(long_name))
    assert ok.exists()


# --- evaluation sets -------------------------------------------------------------------------------

def test_evaluation_images_go_through_the_pixel_cap_and_the_format_allowlist(tmp_path, monkeypatch):
    """Evaluation tars and `datasets` caches are untrusted too: a 17 KB PNG declaring 12000² pixels
    was decoded (+687 MiB), and a TIFF named .jpg was handed to libtiff."""
    from winnow import decode, tasks

    with pytest.raises(tasks.BadMember) as bomb:
        tasks.decode_member("png", _png_declaring(12_000, 12_000))
    assert bomb.value.reason == "decompression_bomb"
    for fmt in ("TIFF", "ICO"):
        with pytest.raises(tasks.BadMember) as other:
            tasks.decode_member("jpg", _image(fmt))
        assert other.value.reason == "corrupt_image"
    for fmt in ("JPEG", "PNG", "WEBP", "BMP", "GIF", "PPM"):   # what evaluation sets are published in
        assert tasks.decode_member("jpg", _image(fmt)).size == (8, 8)
    # a member above the cap is never read: the sample has no image, and is quarantined as such
    monkeypatch.setattr(decode, "MAX_MEMBER_BYTES", 1000)
    big = _image("BMP", (64, 64))
    assert len(big) > 1000
    _tar(tmp_path / "0.tar", [("s0.png", big), ("s0.cls", b"1"), ("s1.png", _image("PNG")), ("s1.cls", b"2")])
    assert [(k, sorted(m), skipped) for k, m, skipped in tasks.iter_tar(tmp_path / "0.tar")] == [
        ("s0", ["cls"], 1), ("s1", ["cls", "png"], 0)]


def test_an_association_sample_with_json_of_the_wrong_types_is_quarantined(tmp_path):
    from winnow import tasks

    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "nshards.txt").write_text("1")
    spec = json.dumps({"cue": "x", "candidates": 5, "associations": []}).encode()
    _tar(tmp_path / "test" / "0.tar", [("s0.json", spec), ("s0.0.png", _image("PNG"))])
    stream = tasks.SplitStream(tasks.TaskData("misc/winogavil", "wds", tmp_path), "test", "association", None, 8)
    blocks = list(stream)
    assert sum(len(b.keys) for b in blocks) == 0
    assert [q for b in blocks for q in b.quarantined] == [("0.tar/s0", "bad_json")]


# --- configuration and checkpoints -----------------------------------------------------------------

def _alias_bomb(levels=9) -> str:
    lines = ["seed: 0", "l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_yaml_aliases_that_expand_past_the_cap_are_a_params_error(tmp_path):
    """A 5.7 KB params.yaml of nested aliases (10^9 nodes expanded) hung a stage that flattened it
    for MLflow. Anchors and aliases of ordinary size still load."""
    from winnow.config import ParamsError, load_yaml, safe_load

    p = tmp_path / "params.yaml"
    p.write_text(_alias_bomb())
    with pytest.raises(ParamsError, match="expand to more than"):
        load_yaml(p)
    with pytest.raises(ParamsError, match="refers to a node that contains it"):
        safe_load("a: &a [1, *a]", "x.yaml")
    with pytest.raises(ParamsError, match="nested too deeply"):
        safe_load("[" * 100_000, "x.yaml")
    assert safe_load("base: &b {lr: 0.1}\nrun: *b\n") == {"base": {"lr": 0.1}, "run": {"lr": 0.1}}


def test_a_stage_given_an_alias_bomb_fails_fast_with_a_config_error(tmp_path):
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    params = (ROOT / "params.yaml").read_text()
    assert "  overrides: {}" in params
    bomb = _alias_bomb().replace("seed: 0\n", "")     # its anchors, then params.yaml using the last
    (tmp_path / "params.yaml").write_text(bomb + params.replace("  overrides: {}", "  overrides: {clip_score: {x: *l8}}"))
    code = "from winnow.stage import main; main('plan', lambda p: {})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env_for_subprocess(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "ParamsError" in proc.stderr and "expand to more than" in proc.stderr and "Traceback" not in proc.stderr


def test_a_checkpoint_that_does_not_load_is_a_model_error(tmp_path):
    """A pickled object (refused by weights_only), garbage bytes and a garbage .safetensors: each is
    a ModelError, never torch's advice to retry with weights_only=False, and no code runs."""
    import pickle

    from winnow import models

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"state_dict": Evil()}))
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage" * 100)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    for name in ("evil.pt", "garbage.pt", "garbage.safetensors"):
        with pytest.raises(models.ModelError, match="does not load as winnow-tiny weights") as err:
            models.load("winnow-tiny", str(tmp_path / name))
        assert "weights_only=False" not in str(err.value)
    assert not marker.exists()


# --- credentials -----------------------------------------------------------------------------------

def _stage_in(tmp_path, body: str, env: dict) -> subprocess.CompletedProcess:
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    code = f"from winnow.stage import main\ndef body(p):\n    {body}\nmain('plan', body)"
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env_for_subprocess() | env,
                          capture_output=True, text=True, timeout=180)


def test_an_unreachable_tracking_store_is_named_and_its_password_masked(tmp_path):
    proc = _stage_in(tmp_path, "return {}", {"MLFLOW_TRACKING_URI": "http://alice:hunter2-SECRET@127.0.0.1:9/",
                                             "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"})
    assert proc.returncode == 1
    assert "TrackingError" in proc.stderr and "127.0.0.1:9" in proc.stderr, proc.stderr[-2000:]
    assert "hunter2" not in proc.stdout + proc.stderr


def test_an_unexpected_error_shows_its_traceback_with_credentials_masked(tmp_path):
    proc = _stage_in(tmp_path, "raise RuntimeError('reading s3://AKIAXYZ:hunter2-SECRET@bucket/x failed')", {})
    assert proc.returncode == 1
    assert "FAILED (unexpected error)" in proc.stderr and "Traceback" in proc.stderr, proc.stderr[-2000:]
    assert "hunter2" not in proc.stderr and "s3://***@bucket/x" in proc.stderr


# --- report ----------------------------------------------------------------------------------------

def test_a_caption_with_dollar_signs_is_drawn_as_text(tmp_path):
    """matplotlib parsed captions as math: "$\\undefinedmacro$ sale" failed the report stage."""
    from winnow import plots

    imgs = [np.zeros((16, 16, 3), np.uint8)] * 3
    png = plots.image_grid(imgs, ["$\\undefinedmacro$ sale", "Save $5 today, $10 tomorrow", "price $\\frac{1}{$ off"],
                           [None, "clean", "scene_text"], "what a step dropped")
    assert png.startswith(b"\x89PNG")


# --- remote storage --------------------------------------------------------------------------------

def test_retiring_a_version_never_deletes_a_listed_name_outside_it(s3_server):
    """A forged pointer's ``previous.files`` named ../../victim: the key was sent to DeleteObject."""
    from tests.s3server import BUCKET
    from winnow import publish, s3

    c = s3.client()
    c.put_object(Bucket=BUCKET, Key="victim/data.parquet", Body=b"keep me")
    c.put_object(Bucket=BUCKET, Key=f"out/x/{publish.VERSIONS}/v1/ok.json", Body=b"{}")
    publish._retire(BUCKET, "out/x", {"version": "v1", "files": ["../../../../victim/data.parquet", "/abs", "ok.json"]},
                    keep=set())
    assert c.get_object(Bucket=BUCKET, Key="victim/data.parquet")["Body"].read() == b"keep me"
    assert s3.list_keys(f"s3://{BUCKET}/out/x/{publish.VERSIONS}/v1") == []


def test_a_remote_folder_with_folder_markers_copies_and_a_file_folder_clash_is_named(s3_server, tmp_path, monkeypatch):
    from tests.s3server import BUCKET
    from winnow import io as wio
    from winnow import s3

    monkeypatch.chdir(tmp_path)
    c = s3.client()
    c.put_object(Bucket=BUCKET, Key="marked/test/", Body=b"")        # what the S3 console's "create folder" makes
    c.put_object(Bucket=BUCKET, Key="marked/test/0.tar", Body=b"tar")
    dest = wio.cache_local(f"s3://{BUCKET}/marked")
    assert (dest / "test" / "0.tar").read_bytes() == b"tar"
    c.put_object(Bucket=BUCKET, Key="clash/x", Body=b"file")
    c.put_object(Bucket=BUCKET, Key="clash/x/y", Body=b"under it")
    with pytest.raises(s3.S3Error, match="is an object and also a folder"):
        wio.cache_local(f"s3://{BUCKET}/clash")


def test_a_run_of_tiny_extension_headers_is_a_corrupt_tar_not_a_recursion_error(tmp_path):
    """tarfile recurses once per pax / GNU long-name record: 2000 tiny ones before one member ended
    in RecursionError, past every tar reader's error handling."""
    from winnow.pool import shards

    blocks = b""
    for _ in range(2000):
        name = b"x" * 600 + b"\0"
        info = tarfile.TarInfo("././@LongLink")
        info.type, info.size = tarfile.GNUTYPE_LONGNAME, len(name)
        blocks += info.tobuf(tarfile.GNU_FORMAT) + name + b"\0" * (-len(name) % 512)
    member = tarfile.TarInfo("a.txt")
    member.size = 5
    (tmp_path / "00000000.tar").write_bytes(blocks + member.tobuf(tarfile.USTAR_FORMAT) + b"hello" + bytes(507 + 1024))
    with pytest.raises(shards.ShardError, match="extended headers before one member"):
        list(shards.iter_tar(str(tmp_path), "00000000"))


def test_datacomps_numpy_centroid_file_loads_and_nothing_else_is_built(tmp_path):
    """DataComp saves its centroids as a NumPy array with torch.save(pickle_protocol=4), which
    torch's weights-only unpickler cannot read; they load (as does torch.save's default protocol 2,
    without torch's protocol warning) through an unpickler that builds an ndarray and nothing else."""
    import pickle
    import warnings
    import zipfile

    import torch

    from winnow import targets
    from winnow.config import ParamsError

    centroids = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    torch.save(centroids, tmp_path / "small_centroids_l14.pt", pickle_protocol=4)
    torch.save(centroids, tmp_path / "protocol2.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("small_centroids_l14.pt", "protocol2.pt"):
            assert np.array_equal(targets.load(str(tmp_path / name), normalize=False), centroids)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as z:        # torch.save's layout, a hostile pickle inside
        z.writestr("evil/data.pkl", pickle.dumps(Evil(), protocol=4))
        z.writestr("evil/version", "3\n")
    with pytest.raises(ParamsError, match="cannot be read"):
        targets.load(str(tmp_path / "evil.pt"))
    # _codecs.encode, which protocol 2 needs for the array's bytes, with a codec other than latin-1:
    # "hex" doubles its input, and a few hundred bytes of re-encodings asked for gigabytes
    codec = b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00abX\x03\x00\x00\x00hex\x86R."
    with zipfile.ZipFile(tmp_path / "codec.pt", "w") as z:
        z.writestr("codec/data.pkl", codec)
        z.writestr("codec/version", "3\n")
    with pytest.raises(ParamsError, match="'hex' is not part of a NumPy array"):
        targets.load(str(tmp_path / "codec.pt"))
    with zipfile.ZipFile(tmp_path / "bomb.pt", "w", zipfile.ZIP_DEFLATED) as z:     # 100 MB in about 100 KB
        z.writestr("bomb/data.pkl", b"\x80\x02" + b"N" * 100_000_000)
    with pytest.raises(ParamsError, match="data.pkl is compressed"):
        targets.load(str(tmp_path / "bomb.pt"))
    torch.save(np.array([{"a": 1}], dtype=object), tmp_path / "objects.pt", pickle_protocol=4)
    with pytest.raises(ParamsError):
        targets.load(str(tmp_path / "objects.pt"))
    assert not marker.exists()
