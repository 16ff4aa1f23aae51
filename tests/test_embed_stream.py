"""The embed stage streams a shard: its batches are decoded and yielded as the tar is read (a worker
holds about one batch of decoded images, not the shard), and its outputs are byte for byte those of
the code that decoded the whole shard first (winnow/embed.py at BEFORE, run from git), on the demo
pool and on DataComp's download layout, quarantine cases included."""
import json
import shutil
import subprocess
import types
import weakref
import zipfile
from typing import NamedTuple

import pytest
import webdataset as wds

from tests.helpers import ROOT
from winnow import embed, models
from winnow.jobs import WorkDir
from winnow.pool import shards
from winnow.pool.view import Pool

BEFORE = "0c80c0e6e8cfc174f78fc669feeebecd6bfccf93"   # the last winnow/embed.py that held a shard's images


FROZEN = ROOT / "tests" / "fixtures" / "embed_before.py"   # that file, kept here: a shallow clone has no history


def _before() -> types.ModuleType:
    """winnow/embed.py as it was at BEFORE, as a module (it imports the rest of winnow as it is now,
    which the streaming change left alone)."""
    src = FROZEN.read_text()
    mod = types.ModuleType("winnow_embed_before")
    exec(compile(src, f"winnow/embed.py@{BEFORE[:7]}", "exec"), mod.__dict__)
    return mod


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    model, _, _ = models.load("winnow-tiny", None)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return {"model": "winnow-tiny", "weights": str(path)}


def _outputs(work: WorkDir, pool: Pool) -> dict:
    """Every byte the job leaves per shard: the parquet file, each npz member (the .npy bytes; the zip
    around them carries write times) and the completion marker's stats."""
    out = {}
    for s in pool.shards:
        out[f"{s}.parquet"] = (work.path / f"{s}.parquet").read_bytes()
        with zipfile.ZipFile(work.path / f"{s}.npz") as z:
            out |= {f"{s}.npz:{n}": z.read(n) for n in sorted(z.namelist())}
        out[f"{s}.stats"] = json.dumps(work.done(s), sort_keys=True)
    return out


def _same_as_before(pool: Pool, spec: dict, tmp_path, workers=(0,), **kw) -> list[dict]:
    """Embed with the code from BEFORE (in this process) and with today's (with each number of
    DataLoader workers): the same stats, and every output byte the same."""
    before = WorkDir("before", "t", tmp_path)
    old = _before().embed_pool(pool, spec, before, workers=0, **kw)
    a = _outputs(before, pool)
    assert len(a) == 5 * len(pool.shards)            # parquet, 3 arrays, stats per shard
    for w in workers:
        after = WorkDir(f"after{w}", "t", tmp_path)
        assert embed.embed_pool(pool, spec, after, workers=w, **kw) == old
        b = _outputs(after, pool)
        assert b.keys() == a.keys() and [k for k in a if a[k] != b[k]] == []
    return old


def _rewrite(tar_path, samples):
    with wds.TarWriter(str(tar_path)) as sink:
        for s in samples:
            sink.write({k: v for k, v in s.items() if v is not None})


def _quarantine_demo(pool_dir):
    """Shard 0: a corrupt JPEG, a missing image, a sample without an image, a sample of no uid of the
    shard, a uid twice in a row (the later image wins) and a uid again at the end (after its batch:
    the shard restarts); shard 1: an empty image and its tar cut in half; shard 2 as generated."""
    samples = list(shards.iter_tar(str(pool_dir), "00000000"))
    samples[0]["jpg"] = b"\xff\xd8\xff garbage"
    samples[3]["jpg"] = None
    dup = dict(samples[40], __key__="dup_a", jpg=samples[41]["jpg"])
    late = dict(samples[10], __key__="zz_late", jpg=samples[120]["jpg"])
    stranger = dict(samples[5], __key__="stranger", json={"uid": "f" * 32})
    del samples[1]
    samples = samples[:40] + [dup] + samples[40:] + [stranger, late]
    _rewrite(pool_dir / "00000000.tar", samples)
    one = list(shards.iter_tar(str(pool_dir), "00000001"))
    one[2]["jpg"] = b""
    _rewrite(pool_dir / "00000001.tar", one)
    p = pool_dir / "00000001.tar"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@pytest.mark.parametrize("decode", ["pil", "tensor"])
def test_outputs_are_those_of_the_whole_shard_code_on_the_demo_pool(demo_pool, spec, tmp_path, decode):
    pool_dir = tmp_path / "pool"
    shutil.copytree(demo_pool, pool_dir)
    for f in pool_dir.glob("00000002*"):   # two shards are the cases
        f.unlink()
    _quarantine_demo(pool_dir)
    pool = Pool.open(str(pool_dir))
    assert pool.shards == ["00000000", "00000001"]
    # 7: batches that do not divide the shard; the streaming code in a spawned DataLoader worker too
    s0, s1 = _same_as_before(pool, spec, tmp_path, workers=(0, 1) if decode == "pil" else (0,), batch_size=7,
                             decode=decode)
    assert (s0["corrupt_images"], s0["missing_images"], s0["unknown_tar_members"]) == (2, 1, 1)
    assert s0["embedded"] == 197 and not s0["tar_error"]
    assert s1["tar_error"] and s1["corrupt_images"] == 1 and 0 < s1["embedded"] < 199
    assert s1["embedded"] + s1["missing_images"] == 199


def _download(dc, tmp_path):
    from stages.pool import external_manifest
    from winnow.config import PoolParams
    from winnow.io import write_json

    write_json(tmp_path / "pool" / "manifest.json", external_manifest(PoolParams(source="datacomp", uri=str(dc["root"]))))
    return Pool.open(str(tmp_path / "pool"))


@pytest.mark.parametrize("decode", ["pil", "tensor"])
def test_outputs_are_those_of_the_whole_shard_code_on_a_download(datacomp_pool, spec, tmp_path, monkeypatch, decode):
    """img2dataset writes a shard in the order its downloads finish, not row order: batches are still
    the rows in row order, settled by its records. A copy with quarantine cases: a corrupt JPEG, a
    truncated image shard, a duplicate uid after its batch, an image shard without its record (read
    whole, then batched), another metadata file's samples in an image shard."""
    dc = datacomp_pool
    pool = _download(dc, tmp_path / "orig")
    rows = {u: r for u, r in zip(dc["table"].uid, dc["table"].row)}
    first = shards.iter_tar(str(dc["shards_dir"]), pool.image_shards(pool.shards[0])[0])
    order = [rows[s["json"]["uid"]] for s in first]
    assert order != sorted(order)                     # the case this test is about
    _same_as_before(pool, spec, tmp_path / "orig", batch_size=16, decode=decode)

    root = tmp_path / "dc"
    shutil.copytree(dc["root"], root)
    sd = root / "shards"
    a, b = pool.image_shards(pool.shards[0])[:2]
    c = pool.image_shards(pool.shards[1])[0]
    samples = list(shards.iter_tar(str(sd), a))
    samples[0]["jpg"] = b"garbage"
    samples += list(shards.iter_tar(str(sd), c))[:2] + [dict(samples[3], __key__="zz", jpg=samples[4]["jpg"])]
    _rewrite(sd / f"{a}.tar", samples)
    p = sd / f"{b}.tar"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    broken = _download({**dc, "root": root}, tmp_path / "broken")
    (sd / f"{c}.parquet").unlink()    # after the join, which the manifest keeps: embed finds no record of c
    stats = _same_as_before(broken, spec, tmp_path / "broken16", batch_size=16, decode=decode)
    assert stats[0]["corrupt_images"] == 1 and stats[0]["unknown_tar_members"] == 0
    assert stats[0]["tar_error"] and b in stats[0]["tar_error"] and not stats[1]["tar_error"]
    assert stats[1]["embedded"] == len(set(dc["uids"][dc["metadata_files"].index(pool.shards[1])]) & dc["downloaded"])
    # the cases took the paths they are meant to: shard 0 restarts at the duplicate, shard 1 (no
    # record of c) is read whole before its first batch
    seen = _Observed(monkeypatch)
    items = _items(_stream(broken, decode), broken.shards[0], seen)
    assert [it.kind for it in items].count("restart") == 1 and items[1].kind != "restart"
    _in_row_order(items, 16)
    seen.read = 0
    items = _items(_stream(broken, decode), broken.shards[1], seen)
    assert {it.read for it in items[1:]} == {seen.read} and _in_row_order(items, 16)


class _Observed:
    """iter_tar, counting the samples read; and the decoded images alive (weakly)."""

    def _free(self):
        self.freed += 1

    @property
    def alive(self) -> int:
        return self.decoded - self.freed

    def __init__(self, monkeypatch):
        self.read, self.decoded, self.freed = 0, 0, 0
        real_iter, real_load = shards.iter_tar, embed.ShardStream._load

        def iter_tar(uri, shard):
            for s in real_iter(uri, shard):
                self.read += 1
                yield s

        def load(stream, data):
            img = real_load(stream, data)
            if img is not None:
                self.decoded += 1
                weakref.finalize(img, self._free)
            return img

        monkeypatch.setattr(shards, "iter_tar", iter_tar)
        monkeypatch.setattr(embed.ShardStream, "_load", load)


def _stream(pool, decode="pil", batch_size=16):
    _, pre, tok = models.load("winnow-tiny", None)
    return embed.ShardStream(pool, pool.shards, pre, tok, batch_size, decode)


class Item(NamedTuple):
    kind: str
    read: int               # samples read from the tar(s) when the item arrived
    alive: int              # decoded images alive then
    rows: list | None       # a batch's rows


def _items(stream, shard, seen) -> list[Item]:
    out = []
    for item in stream._shard(shard):
        out.append(Item(item[0], seen.read, seen.alive, item[2].tolist() if item[0] in ("images", "jpegs") else None))
        del item
    return out


def _in_row_order(items: list[Item], batch_size: int) -> list[int]:
    """The batches' rows after the last restart: every row once, ascending, cut every batch_size."""
    last = max([k for k, it in enumerate(items) if it.kind == "restart"], default=0)
    batches = [it.rows for it in items[last:] if it.rows is not None]
    rows = [r for b in batches for r in b]
    assert rows == sorted(set(rows)) and all(len(b) == batch_size for b in batches[:-1]) and 0 < len(batches[-1]) <= batch_size
    return rows


@pytest.mark.parametrize("decode", ["pil", "tensor"])
def test_a_shard_is_batched_as_its_tar_is_read(demo_pool, monkeypatch, decode):
    seen = _Observed(monkeypatch)
    items = _items(_stream(Pool.open(str(demo_pool)), decode), "00000000", seen)
    assert [it.kind for it in items] == ["start"] + ["images" if decode == "pil" else "jpegs"] * 13 + ["end"]
    assert items[0].read == 0 and seen.read == 200   # uids and tokens before any sample is read
    # rows 0..15 go out once row 16 has been read: each full batch while the rest of the tar is unread
    assert [it.read for it in items[1:-2]] == [16 * (k + 1) + 1 for k in range(12)]
    assert _in_row_order(items, 16) == list(range(200))
    assert max(it.alive for it in items) <= 16       # at most one batch of decoded images alive


def test_a_download_is_batched_as_its_image_shards_are_read(datacomp_pool, monkeypatch, tmp_path):
    """img2dataset's completion order, batched in row order as the records settle the rows."""
    dc = datacomp_pool
    pool = _download(dc, tmp_path)
    seen = _Observed(monkeypatch)
    items = _items(_stream(pool, batch_size=8), pool.shards[0], seen)
    batches = [it for it in items if it.kind == "images"]
    assert len(batches) > 4 and batches[0].read < seen.read / 2 and "restart" not in [it.kind for it in items]
    uids = dc["uids"][dc["metadata_files"].index(pool.shards[0])]
    assert _in_row_order(items, 8) == [i for i, u in enumerate(uids) if u in dc["downloaded"]]
    assert max(it.alive for it in items) <= 8


def test_a_duplicate_uid_after_its_batch_restarts_the_shard(demo_pool, monkeypatch, tmp_path):
    pool_dir = tmp_path / "pool"
    shutil.copytree(demo_pool, pool_dir)
    samples = list(shards.iter_tar(str(pool_dir), "00000000"))
    _rewrite(pool_dir / "00000000.tar", samples + [dict(samples[3], __key__="zz", jpg=samples[9]["jpg"])])
    seen = _Observed(monkeypatch)
    items = _items(_stream(Pool.open(str(pool_dir))), "00000000", seen)
    kinds = [it.kind for it in items]
    # 12 batches as the tar is read; the uid of row 3 again: void, read again whole (held encoded), batched
    assert kinds.index("restart") == 13 and kinds.count("images") == 12 + 13 and kinds[-1] == "end"
    assert _in_row_order(items, 16) == list(range(200))
    assert seen.read == 2 * 201 and max(it.alive for it in items) <= 16


def test_frozen_reference_is_the_commit():
    """tests/fixtures/embed_before.py is winnow/embed.py at BEFORE (checked where history exists)."""
    try:
        src = subprocess.run(["git", "show", f"{BEFORE}:winnow/embed.py"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no git history here (a shallow clone)")
    assert FROZEN.read_text().split("\n", 2)[2] == src
