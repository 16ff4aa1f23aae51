"""The filter and reshard paths that stream at pool scale: decisions optional, uids parsed from
Arrow buffers, sorted runs merged, the subset located shard by shard, truth metrics in batches,
per-unit work files that a reboot discards."""
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from winnow import jobs
from winnow.demo.truth import truth_metrics
from winnow.executor import Executor
from winnow.filters.engine import load_recipe, run
from winnow.pool import uids as U
from winnow.pool.view import Pool
from winnow.reshard import plan, reshard


def _hexes(rng, n):
    return [r.tobytes().hex() for r in rng.integers(0, 256, (n, 16), dtype=np.uint8)]


def test_arrow_uids_parse_like_strings():
    rng = np.random.default_rng(0)
    h = _hexes(rng, 5000)
    h[7] = h[7].upper()
    ref = U.hex_to_array(np.array(h, dtype=object), sort=False)
    col = pa.array(h)
    assert U.hex_to_array(col, sort=False).tobytes() == ref.tobytes()
    assert U.hex_to_array(col.slice(11, 300), sort=False).tobytes() == ref[11:311].tobytes()
    assert U.hex_to_array(pa.chunked_array([col.slice(0, 9), col.slice(9)]), sort=False).tobytes() == ref.tobytes()
    # a uid that is not 32 hex characters is a named error on either path
    for bad in ["g" * 32, " " * 32, "a" * 31 + " ", "é" * 16, "a" * 31, None]:
        with pytest.raises(U.UidError):
            U.hex_to_array(pa.array(h[:3] + [bad]))


def test_sort_uids_merges_runs_and_handles_64_bit_collisions():
    rng = np.random.default_rng(1)
    parts = []
    for k in range(40):
        a = np.empty(300, U.UID_DTYPE)
        a["f0"] = rng.integers(0, 2**63, 300, dtype=np.uint64)
        a["f1"] = rng.integers(0, 2**63, 300, dtype=np.uint64)
        if k in (3, 17):      # equal upper halves across runs, lower halves out of order
            a["f0"][:5] = 12345
            a["f1"][:5] = np.arange(5) * (1 if k == 3 else -1) + 100
        parts.append(U.sort_uids(np.repeat(a, rng.integers(1, 3, 300))))
    cat = np.concatenate(parts)
    assert U.sort_uids(cat, runs=True).tobytes() == np.sort(cat).tobytes() == U.sort_uids(cat).tobytes()


def test_search_is_searchsorted():
    rng = np.random.default_rng(2)
    sub = U.hex_to_array(_hexes(rng, 3000) * 2)           # every uid twice: up-sampled
    q = np.concatenate([sub[rng.integers(0, len(sub), 500)], U.hex_to_array(_hexes(rng, 50), sort=False)])
    lo, hi = U.search(sub, q)
    assert (lo == np.searchsorted(sub, q, "left")).all() and (hi == np.searchsorted(sub, q, "right")).all()
    assert set((hi - lo).tolist()) == {0, 2}


@pytest.mark.parametrize("recipe", ["basic", "clip_b32_top30"])
def test_decisions_off_gives_the_same_subset(demo_pool, tmp_path, recipe):
    pool = Pool.open(str(demo_pool))
    ex = Executor("processes", 2)
    on = run(load_recipe(recipe), pool, str(tmp_path / "on"), ex)
    (tmp_path / "off").mkdir()
    (tmp_path / "off" / "decisions.parquet").write_bytes(b"an earlier run's")
    off = run(load_recipe(recipe), pool, str(tmp_path / "off"), ex, decisions=False)
    assert (tmp_path / "on" / "uids.npy").read_bytes() == (tmp_path / "off" / "uids.npy").read_bytes()
    assert not (tmp_path / "off" / "decisions.parquet").exists()
    strip = lambda f: json.dumps({k: v for k, v in f.items()} | {"steps": [{k: v for k, v in s.items() if k != "seconds"}
                                                                        for s in f["steps"]]}, sort_keys=True)  # noqa: E731
    assert strip(on) == strip(off)


def test_decisions_table_is_every_shard_in_order(demo_pool, tmp_path):
    """The merged table holds each shard's rows in pool order, with the funnel's counts, whatever
    its row-group layout."""
    pool = Pool.open(str(demo_pool))
    f = run(load_recipe("basic"), pool, str(tmp_path))
    d = pq.read_table(tmp_path / "decisions.parquet")
    uids = pa.concat_arrays([pq.read_table(demo_pool / f"{s}.parquet", columns=["uid"])["uid"].combine_chunks()
                             for s in pool.shards])
    assert d["uid"].combine_chunks().equals(uids)
    assert d["shard"].to_pylist() == [s for s in pool.shards for _ in range(len(pool.batch(s)))]
    df = d.to_pandas()
    for st in f["steps"]:
        assert int((df["dropped_by"] == st["step"]).sum()) == st["dropped_here"]
        assert int(df[f"keep:{st['step']}"].notna().sum()) == st["decided"]
    assert int(df["multiplicity"].sum()) == f["subset_size"]
    kept = U.hex_to_array(df.loc[df.multiplicity > 0, "uid"].to_numpy(dtype=object))
    assert U.load(tmp_path / "uids.npy").tobytes() == kept.tobytes()


def test_truth_metrics_stream_equals_whole_frame(demo_pool, tmp_path):
    pool = Pool.open(str(demo_pool))
    recipe = load_recipe("basic")
    run(recipe, pool, str(tmp_path), decide="all")
    truth = pd.read_parquet(demo_pool / "truth.parquet")
    whole = truth_metrics(pd.read_parquet(tmp_path / "decisions.parquet"), truth, recipe.labels())
    batched = truth_metrics(str(tmp_path / "decisions.parquet"), truth, recipe.labels(), batch_rows=37)
    assert whole == batched
    assert whole["image_size"]["bad_size"]["recall"] == 1.0


def test_plan_locates_the_subset_and_names_what_the_pool_lacks(demo_pool, tmp_path):
    pool = Pool.open(str(demo_pool))
    first, last = pool.shards[0], pool.shards[-1]
    a = pq.read_table(demo_pool / f"{first}.parquet", columns=["uid"])["uid"].to_pylist()[:10]
    b = pq.read_table(demo_pool / f"{last}.parquet", columns=["uid"])["uid"].to_pylist()[:3]
    stranger = "f" * 32
    subset = U.hex_to_array(a + a[:2] + b + [stranger])
    where = plan(pool, subset)
    assert where["per_shard"] == {first: 12, last: 3}
    assert where["image_shards"] == [first, last]
    assert where["not_in_pool"] == 1 and where["not_in_pool_examples"] == [stranger]
    assert where["pool_rows"] == sum(len(pool.batch(s)) for s in pool.shards)
    # the resharder opens only those tars and writes every copy
    meta = reshard(pool, U.hex_to_array(a + a[:2] + b), str(tmp_path / "subset"), shard_size=7, where=where)
    assert meta["output_count"] == 15 and meta["uids_not_found"] == 0


@pytest.mark.parametrize("part_rows", [40, 1 << 20])
def test_plan_in_partitions_agrees_with_a_whole_subset_lookup(demo_pool, tmp_path, monkeypatch, part_rows):
    """Byte partitions of any size give what one dict over the whole subset gives: per-shard counts,
    what the pool lacks (examples in subset order), and the resharder's bytes and meta."""
    from winnow import reshard as R

    pool = Pool.open(str(demo_pool))
    rng = np.random.default_rng(part_rows)
    pool_uids = {s: pq.read_table(demo_pool / f"{s}.parquet", columns=["uid"])["uid"].to_pylist() for s in pool.shards}
    every = [u for us in pool_uids.values() for u in us]
    picked = list(rng.choice(every, 150, replace=False)) + list(rng.choice(every, 40)) + _hexes(rng, 12)
    subset = U.hex_to_array(picked)
    U.save(tmp_path / "uids.npy", subset)
    copies = pd.Series(picked).value_counts().to_dict()
    want_shard = {s: sum(copies.get(u, 0) for u in us) for s, us in pool_uids.items()}
    stranger = sorted({u for u in picked if u not in set(every)})
    monkeypatch.setattr(R, "PART_ROWS", part_rows)
    with plan(pool, str(tmp_path / "uids.npy"), examples=3) as where:
        assert where["per_shard"] == {s: c for s, c in want_shard.items() if c}
        assert where["not_in_pool"] == len([u for u in picked if u in stranger])
        assert where["not_in_pool_examples"] == stranger[:3]
        assert where["pool_rows"] == len(every) and where["selected"] == len(picked)
        meta = reshard(pool, str(tmp_path / "uids.npy"), str(tmp_path / "out"), shard_size=64, where=where)
    assert meta["output_count"] == len(picked) - where["not_in_pool"]
    assert meta["uids_not_found"] == where["not_in_pool"] and meta["input_uids"] == len(picked)
    assert (tmp_path / "out" / "sample_ids.npy").read_bytes() == (tmp_path / "uids.npy").read_bytes()
    monkeypatch.setattr(R, "PART_ROWS", 1 << 20)
    ref = reshard(pool, subset, str(tmp_path / "ref"), shard_size=64)     # in-memory subset, its own plan
    assert ref == meta
    for f in sorted((tmp_path / "ref").iterdir()):
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes(), f.name


def test_unsynced_work_dir_from_before_a_reboot_is_discarded(tmp_path, monkeypatch):
    if jobs.UNIT_DURABLE:
        pytest.skip("no boot id here: unit files are fsynced")
    w = jobs.WorkDir("job", "k1", tmp_path, unsynced=True)
    w.mark("u0", {"n": 1})
    (w.path / "u0.npy").write_bytes(b"unsynced")
    assert jobs.WorkDir("job", "k1", tmp_path, unsynced=True).done("u0") == {"n": 1}      # same boot: resumes
    durable = jobs.WorkDir("other", "k1", tmp_path)          # a job whose files are fsynced
    durable.mark("u0", {"n": 2})
    monkeypatch.setattr(jobs, "BOOT_ID", "another-boot")
    w2 = jobs.WorkDir("job", "k1", tmp_path, unsynced=True)
    assert w2.done("u0") is None and not (w2.path / "u0.npy").exists()
    assert (w2.path / "_boot").read_text() == "another-boot"
    assert jobs.WorkDir("other", "k1", tmp_path).done("u0") == {"n": 2}     # untouched by the reboot check


def test_threshold_step_after_a_dropping_step(demo_pool, tmp_path):
    """A score read once per shard (ShardView.cached) is the whole shard's, also when only the
    survivors of an earlier step ask for it."""
    pool = Pool.open(str(demo_pool))
    recipe = {"name": "t", "steps": [{"step": "image_size", "min_side": 200},
                                     {"step": "clip_score", "score": "clip_b32_similarity_score", "threshold": 0.2}]}
    f = run(load_recipe(recipe), pool, str(tmp_path))
    meta = pd.concat([pq.read_table(demo_pool / f"{s}.parquet").to_pandas() for s in pool.shards])
    side = np.minimum(meta.original_width, meta.original_height)
    aspect = np.maximum(meta.original_width, meta.original_height) / side
    want = (side >= 200) & (aspect <= 3.0) & (meta.clip_b32_similarity_score >= np.float32(0.2))
    assert f["steps"][0]["kept_after"] < 600 and f["kept_unique"] == int(want.sum())
    assert U.load(tmp_path / "uids.npy").tobytes() == U.hex_to_array(meta.uid[want].to_numpy(dtype=object)).tobytes()
