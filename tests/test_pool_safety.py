"""Untrusted pool input stays harmless and fails by name: tar members through an allowlist and a
size cap, decompression bombs quarantined before decoding, embeddings that do not pair up."""
import io
import pickle
import tarfile

import numpy as np
import pytest

from tests.fixtures.evalsets import bomb_png, malicious_pickle
from winnow import decode
from winnow.pool import shards
from winnow.pool.shards import ShardError


def _tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_tar_members_outside_the_allowlist_are_never_read(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    _tar(tmp_path / "00000000.tar", {"a.jpg": b"x", "a.json": b'{"uid": "u"}', "a.pyd": malicious_pickle(marker),
                                     "a.pickle": pickle.dumps({"x": 1}), "b.txt": b"hello"})
    read = []
    real = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m: read.append(m.name) or real(self, m))
    samples = list(shards.iter_tar(str(tmp_path), "00000000"))
    assert [s["__key__"] for s in samples] == ["a", "b"] and samples[0]["json"] == {"uid": "u"}
    assert sorted(read) == ["a.jpg", "a.json", "b.txt"] and not marker.exists()


def test_a_member_over_the_size_cap_is_skipped_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(decode, "MAX_MEMBER_BYTES", 1000)
    _tar(tmp_path / "00000000.tar", {"a.jpg": b"\xff" * 5000, "a.json": b'{"uid": "u"}', "b.jpg": b"\xff" * 10})
    samples = {s["__key__"]: s for s in shards.iter_tar(str(tmp_path), "00000000")}
    assert samples["a"]["jpg"] is None and samples["b"]["jpg"] == b"\xff" * 10


def test_a_decompression_bomb_is_a_value_error_before_decoding():
    data = bomb_png()
    assert len(data) < 2_000_000
    with pytest.raises(decode.ImageTooLarge):
        shards.decode_image(data)
    assert isinstance(decode.ImageTooLarge("x"), ValueError)   # embed and reshard quarantine ValueErrors


def test_embeddings_of_the_wrong_shape_are_named(tmp_path, demo_pool):
    import shutil

    from winnow.filters.engine import load_recipe, run
    from winnow.pool.view import Pool

    pool = tmp_path / "pool"
    shutil.copytree(demo_pool, pool)
    z = dict(np.load(pool / "00000001.npz"))
    z["l14_txt"] = z["l14_txt"][:, :512]                      # an npz with the wrong embedding width
    np.savez(pool / "00000001.npz", **z)
    recipe = load_recipe({"name": "x", "steps": [{"step": "clip_score", "embeddings": ["l14_img", "l14_txt"],
                                                  "fraction": 0.3}]})
    with pytest.raises(ShardError, match=r"shard 00000001: embeddings 'l14_img' \(200, 768\) and 'l14_txt' \(200, 512\)"):
        run(recipe, Pool.open(str(pool)), str(tmp_path / "out"))
    z["l14_txt"] = np.zeros((200, 768, 2), np.float16)           # not a (rows, width) array
    np.savez(pool / "00000001.npz", **z)
    with pytest.raises(ShardError, match="has shape"):
        shards.read_npz(str(pool), "00000001")
