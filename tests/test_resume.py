"""Shard-level jobs resume after SIGKILL: finished shards are not redone and the outputs equal an
uninterrupted run's, byte for byte."""
import subprocess
import sys

import pytest

from tests.conftest import ROOT, env_for_subprocess, kill_when


def _bench_pool(path, samples=60000, shards=12):
    sys.path.insert(0, str(ROOT / "bench"))
    import importlib

    gen = importlib.import_module("filter").generate
    gen(path, samples, shards, dim=8)
    return path


@pytest.mark.slow   # builds a 60,000-sample pool
def test_killed_filter_resumes_from_its_finished_shards(tmp_path, monkeypatch):
    from winnow.filters import engine
    from winnow.pool.view import Pool

    pool_dir = _bench_pool(tmp_path / "pool")
    ref = tmp_path / "ref"
    engine.run(engine.load_recipe("basic"), Pool.open(str(pool_dir)), str(ref))

    out, work = tmp_path / "out", tmp_path / "work"
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "from winnow.filters import engine\nfrom winnow.pool.view import Pool\n"
              f"engine.run(engine.load_recipe('basic'), Pool.open({str(pool_dir)!r}), {str(out)!r}, work_root={str(work)!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env_for_subprocess())
    kill_when(proc, lambda: list(work.glob("filter/*/_done/decisions-*.json")))
    done = sorted(p.stem for p in work.glob("filter/*/_done/decisions-*.json"))
    assert 1 <= len(done) < 12, f"killed too early or too late: {done}"
    assert not (out / "uids.npy").exists()

    calls = []
    real = engine._decide
    monkeypatch.setattr(engine, "_decide", lambda steps, fitted, batch, *a: calls.append(batch.shard) or real(steps, fitted, batch, *a))
    engine.run(engine.load_recipe("basic"), Pool.open(str(pool_dir)), str(out), work_root=str(work))
    assert len(calls) == 12 - len(done)                       # only the unfinished shards were decided
    assert not {c for c in calls} & {d.split("-", 1)[1] for d in done}
    for name in ("uids.npy", "decisions.parquet"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert not any((work / "filter").iterdir())                # the work directory goes when complete


def test_killed_reshard_resumes_after_its_last_closed_shard(demo_pool, tmp_path):
    import numpy as np

    from winnow.pool import shards
    from winnow.pool import uids as U
    from winnow.pool.view import Pool
    from winnow.reshard import reshard

    pool = Pool.open(str(demo_pool))
    uids = np.concatenate([shards.read_meta(str(demo_pool), s, ["uid"])["uid"].to_numpy(zero_copy_only=False)
                           for s in pool.shards])
    subset = U.hex_to_array(np.concatenate([uids, uids[::3]]))        # every uid, a third of them twice
    ref = reshard(pool, subset, str(tmp_path / "ref"), shard_size=40)

    U.save(tmp_path / "subset.npy", subset)
    out, work = tmp_path / "out", tmp_path / "work"
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "from winnow.pool import uids as U\nfrom winnow.pool.view import Pool\nfrom winnow.reshard import reshard\n"
              f"reshard(Pool.open({str(demo_pool)!r}), U.load({str(tmp_path / 'subset.npy')!r}), {str(out)!r}, "
              f"shard_size=40, work_root={str(work)!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env_for_subprocess())
    kill_when(proc, lambda: len(list(work.glob("reshard/*/_done/*.json"))) >= 3)
    closed = {p.name: p.stat().st_mtime_ns for p in work.glob("reshard/*/*.tar")
              if (p.parent / "_done" / f"{p.stem}.json").exists()}
    assert 3 <= len(closed) < ref["output_shard_count"], "killed too late"
    assert not out.exists()

    build = next((work / "reshard").iterdir())
    meta = reshard(pool, subset, str(out), shard_size=40, work_root=str(work))
    assert meta == ref
    for f in sorted((tmp_path / "ref").iterdir()):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    for name, mtime in closed.items():         # closed shards were moved into place, never re-written
        assert (out / name).stat().st_mtime_ns == mtime, name
    assert not build.exists()
