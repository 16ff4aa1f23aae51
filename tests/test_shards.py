import io
import tarfile

import numpy as np
import pyarrow as pa
import pytest

from winnow.io import atomic_dir, atomic_file
from winnow.pool import shards


def test_npz_float16_on_disk_float32_in_memory(tmp_path):
    v = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    shards.write_npz(str(tmp_path), "00000000", {"b32_img": v})
    with np.load(tmp_path / "00000000.npz") as z:
        assert z["b32_img"].dtype == np.float16
    back = shards.read_npz(str(tmp_path), "00000000")
    assert back["b32_img"].dtype == np.float32
    np.testing.assert_allclose(back["b32_img"], v, atol=2e-3)


def test_npz_missing_key_is_named(tmp_path):
    shards.write_npz(str(tmp_path), "00000000", {"b32_img": np.zeros((2, 2))})
    with pytest.raises(shards.ShardError, match="l14_img"):
        shards.read_npz(str(tmp_path), "00000000", ["l14_img"])


def test_discover_finds_shards_in_order(tmp_path):
    t = pa.table({"uid": ["0" * 32]})
    for n in (2, 0, 1):
        shards.write_meta(str(tmp_path), shards.stem(n), t)
    (tmp_path / "notashard.parquet").write_bytes(b"")
    assert shards.discover(str(tmp_path)) == ["00000000", "00000001", "00000002"]
    with pytest.raises(shards.ShardError, match="no"):
        shards.discover(str(tmp_path / "nowhere"))


def test_atomic_file_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_file(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not dest.exists() and list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "d"
    with atomic_dir(dest) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("killed")
    assert sorted(p.name for p in dest.iterdir()) == ["a"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_tar_round_trip_and_hostile_member_names(tmp_path):
    shards.write_tar(str(tmp_path), "00000000", [{"__key__": "k0", "jpg": b"\xff\xd8x", "txt": "hi",
                                                  "json": {"uid": "0" * 32}}])
    got = list(shards.iter_tar(str(tmp_path), "00000000"))
    assert got[0]["txt"] == "hi" and got[0]["json"]["uid"] == "0" * 32 and got[0]["ext"] == "jpg"
    # img2dataset --encode_format png/webp: the image keeps its suffix (reshard writes it under it)
    shards.write_tar(str(tmp_path), "00000002", [{"__key__": "k0", "png": b"\x89PNGx", "txt": "hi"}])
    assert [(s["ext"], s["jpg"]) for s in shards.iter_tar(str(tmp_path), "00000002")] == [("png", b"\x89PNGx")]
    assert shards.read_stats(str(tmp_path), "00000000")["successes"] == 1
    # members named ../ or absolute are read in memory, never written anywhere
    evil = tmp_path / "evil"
    evil.mkdir()
    with tarfile.open(evil / "00000001.tar", "w") as tf:
        for name in ("../escape.txt", "/tmp/winnow_abs_escape.txt"):
            data = b"pwned"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    list(shards.iter_tar(str(evil), "00000001"))
    assert not (tmp_path / "escape.txt").exists()
    import os

    assert not os.path.exists("/tmp/winnow_abs_escape.txt")


def test_truncated_tar_names_the_shard(tmp_path):
    shards.write_tar(str(tmp_path), "00000000", [{"__key__": f"k{i}", "jpg": b"x" * 4000, "txt": "t",
                                                  "json": {"uid": "%032x" % i}} for i in range(5)])
    p = tmp_path / "00000000.tar"
    p.write_bytes(p.read_bytes()[:6000])
    with pytest.raises(shards.ShardError, match="00000000"):
        list(shards.iter_tar(str(tmp_path), "00000000"))


def test_corrupt_jpeg_is_a_value_error():
    with pytest.raises(ValueError, match="corrupt|unreadable image"):
        shards.decode_image(b"\xff\xd8\xff\xe0 not really a jpeg")
