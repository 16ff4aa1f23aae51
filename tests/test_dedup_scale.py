"""dedup_exact at bounded memory (#15): hash partitions spilled to the run's scratch give the kept
set and funnel counts of the sorted-in-memory algorithm it replaced, on pools with duplicates
across and within shards, null and empty digests, an empty shard, all duplicates and hundreds of
partitions; the fitted value is a directory and counts, so it pickles small."""
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from winnow.executor import Executor
from winnow.filters import build_step
from winnow.filters.dedup import digest_keys
from winnow.filters.engine import load_recipe, run
from winnow.pool import shards
from winnow.pool import uids as U
from winnow.pool.view import Pool


def make_pool(root, digests: list[list], seed: int = 0) -> Pool:
    """A pool whose shard k has the digests ``digests[k]`` (None: null), distinct uids, and image
    sizes of which about a quarter fail ``image_size``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names, n = [], 0
    for k, ds in enumerate(digests):
        names.append(shards.stem(k))
        side = np.where(rng.random(len(ds)) < 0.25, 100, 300)
        table = pa.table({"uid": pa.array([f"{n + i:032x}" for i in range(len(ds))], pa.string()),
                          "sha256": pa.array(ds, pa.string()), "original_width": side, "original_height": side})
        pq.write_table(table, shards.path(str(root), names[-1], "parquet"))
        n += len(ds)
    return Pool(uri=str(root), shards=names, manifest={})


def reference(pool: Pool, alive) -> tuple[dict, dict]:
    """The algorithm before #15: every survivor's key and pool position in memory, one lexsort.
    (shard -> sorted rows to drop, funnel counts)."""
    keys, owners, nulls = [], [], 0
    for k, shard in enumerate(pool.shards):
        h, null = digest_keys(pool.batch(shard).arrow("sha256"), shard, "sha256")
        rows = np.flatnonzero(alive(shard))
        nulls += int(null[rows].sum())
        rows = rows[~null[rows]]
        keys.append(h[rows])
        owners.append(np.stack([np.full(len(rows), k), rows], axis=1))
    keys, owners = np.concatenate(keys), np.concatenate(owners)
    order = np.lexsort((owners[:, 1], owners[:, 0], keys))
    first = np.ones(len(order), bool)
    first[1:] = keys[order][1:] != keys[order][:-1]
    dup = owners[order][~first]
    rows = {pool.shards[k]: np.sort(dup[dup[:, 0] == k, 1]) for k in np.unique(dup[:, 0])}
    return rows, {"unique_images": int(first.sum()), "duplicates": int(len(dup)), "null_hashes": nulls}


def random_digests(rng, sizes: list[int], popular: int = 40) -> list[list]:
    """Fresh random digests, a third of them drawn from ``popular`` repeated ones (so copies fall in
    the same shard and across shards), some null, some empty, some upper-case, some sharing only
    their first 64 bits with another (the same key, so a duplicate)."""
    def hex_(n):
        return rng.integers(0, 256, n, dtype=np.uint8).tobytes().hex()

    pop = [hex_(32) for _ in range(popular)]
    out = []
    for size in sizes:
        ds = []
        for _ in range(size):
            u = rng.random()
            ds.append(None if u < 0.05 else "" if u < 0.08 else pop[rng.integers(popular)] if u < 0.4
                      else pop[rng.integers(popular)][:16] + hex_(24) if u < 0.45
                      else pop[rng.integers(popular)].upper() if u < 0.5 else hex_(32))
        out.append(ds)
    return out


def masks(pool: Pool, rate: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {s: rng.random(len(pool.batch(s))) < rate for s in pool.shards}


def check_same(pool: Pool, alive: dict, **params):
    """dedup_exact equals the reference: every shard's keep mask, and the counts."""
    step = build_step({"step": "dedup_exact", **params}, "test")
    fitted = step.fit(pool, alive.get)
    want, counts = reference(pool, alive.get)
    assert step.report(fitted) == counts
    for s in pool.shards:
        np.testing.assert_array_equal(fitted.of(s), want.get(s, np.zeros(0, np.int64)))
        keep = step.verdict(pool.batch(s), fitted)
        assert keep.tolist() == (~np.isin(np.arange(len(alive[s])), want.get(s, []))).tolist()
    return fitted


RNG = np.random.default_rng(15)
CASES = {
    "mixed": random_digests(RNG, [300, 250, 400, 120]),
    "empty shard": random_digests(RNG, [200, 0, 150, 0]),
    "all duplicates": [["ab" * 32] * n for n in (50, 80, 0, 30)],
    "all null": [[None, ""] * 20, [None] * 7],
    "within one shard": random_digests(RNG, [700], popular=5),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("partition_rows", [2_000_000, 64, 1])
def test_exact_equals_the_in_memory_algorithm(tmp_path, case, partition_rows):
    pool = make_pool(tmp_path / "pool", CASES[case])
    for rate in (1.0, 0.6):
        alive = masks(pool, rate, seed=int(rate * 10))
        check_same(pool, alive, partition_rows=partition_rows)                                  # no scratch
        check_same(replace(pool, scratch=str(tmp_path / f"scratch-{rate}")), alive, partition_rows=partition_rows)


def test_many_partitions_spill_to_scratch_and_leave_only_drop_files(tmp_path):
    pool = make_pool(tmp_path / "pool", CASES["mixed"])
    pool = replace(pool, scratch=str(tmp_path / "scratch"))
    fitted = check_same(pool, masks(pool, 1.0, 0), partition_rows=3)    # ~1000 survivors: 512 partitions
    files = sorted(p.name for p in (tmp_path / "scratch").glob("*/*"))
    assert fitted.where.startswith(str(tmp_path / "scratch"))
    assert files == [f"{s}.npy" for s in pool.shards]       # every shard has copies; the partitions are gone


def test_a_refit_after_a_kill_ignores_the_killed_fits_files(tmp_path):
    """A fit killed mid-way leaves partial partitions and drop files; the next fit starts clean."""
    pool = make_pool(tmp_path / "pool", CASES["empty shard"])
    pool = replace(pool, scratch=str(tmp_path / "scratch"))
    alive = masks(pool, 1.0, 0)
    fitted = check_same(pool, alive, partition_rows=16)
    where = fitted.where
    (parts := Path(where) / "parts").mkdir()
    (parts / "part-0").write_bytes(np.zeros(7, np.uint64).tobytes())          # a torn append
    (parts / f"drops-{pool.shards[0]}").write_bytes(np.arange(5, dtype=np.int64).tobytes())
    np.save(f"{where}/{pool.shards[1]}.npy", np.arange(3))   # a shard without copies, given drops
    assert check_same(pool, alive, partition_rows=16).where == where


def test_fitted_value_pickles_small(tmp_path):
    rng = np.random.default_rng(1)
    digests = [[rng.integers(0, 256, 32, dtype=np.uint8).tobytes().hex() for _ in range(2000)]]
    digests += [[digests[0][i] for i in rng.integers(0, 2000, 2000)] for _ in range(3)]   # 6000 copies
    pool = replace(make_pool(tmp_path / "pool", digests), scratch=str(tmp_path / "scratch"))
    fitted = check_same(pool, masks(pool, 1.0, 0), partition_rows=500)
    assert fitted.counts["duplicates"] >= 6000
    assert len(pickle.dumps(fitted)) < 10_000


def test_engine_run_matches_the_in_memory_algorithm(tmp_path):
    """End to end on worker processes: a survivors-only dedup after image_size, the drop files read
    by the workers; uids.npy bytes, the keep column and the funnel state are the reference's."""
    pool = make_pool(tmp_path / "pool", CASES["mixed"] + CASES["empty shard"], seed=3)
    recipe = load_recipe({"name": "dedup", "steps": [{"step": "image_size"},
                                                     {"step": "dedup_exact", "partition_rows": 100}]})
    funnel = run(recipe, pool, str(tmp_path / "out"), executor=Executor("processes", 2),
                 work_root=str(tmp_path / "work"))

    size = recipe.steps[0]
    alive = {s: size.verdict(pool.batch(s)) for s in pool.shards}
    want, counts = reference(pool, alive.get)
    keep = {s: alive[s] & ~np.isin(np.arange(len(alive[s])), want.get(s, [])) for s in pool.shards}
    uids = np.concatenate([pool.batch(s).column("uid")[keep[s]] for s in pool.shards])
    U.save(tmp_path / "want.npy", U.hex_to_array(uids))
    assert (tmp_path / "out" / "uids.npy").read_bytes() == (tmp_path / "want.npy").read_bytes()

    d = pd.read_parquet(tmp_path / "out" / "decisions.parquet")
    decided = np.concatenate([alive[s] for s in pool.shards])
    col = d["keep:dedup_exact"]
    assert col.isna().to_numpy().tolist() == (~decided).tolist()
    assert col[decided].astype(bool).tolist() == np.concatenate([keep[s][alive[s]] for s in pool.shards]).tolist()
    assert funnel["steps"][1]["state"] == counts and counts["duplicates"] > 0


def test_two_equal_dedup_steps_keep_their_own_working_files(tmp_path):
    """Two dedup_exact steps with the same parameters shared one scratch directory, wiped by the
    later fit: inside an any_of branch the first step then applied the second one's drops."""
    n = 20
    table = pa.table({"uid": [f"{i:032x}" for i in range(n)], "sha256": [f"{i % 5:064x}" for i in range(n)],
                      "text": [f"caption number {i} words" for i in range(n)]})   # rows i, i+5, …: one image
    pq.write_table(table, shards.path(str(tmp_path), shards.stem(0), "parquet"))
    pool = Pool(uri=str(tmp_path), shards=[shards.stem(0)], manifest={})
    firsts = {"step": "text_regex", "drop_pattern": "number [0-4] "}    # drops each image's first copy
    none = {"name": "none", "steps": [{"step": "text_regex", "name": "all", "drop_pattern": "."}]}
    for steps in ([{"step": "dedup_exact"}, firsts], [{"step": "dedup_exact"}, firsts, {"step": "dedup_exact"}]):
        f = run(load_recipe({"name": "r", "steps": [{"step": "any_of", "branches": [{"name": "dd", "steps": steps}, none]}]}),
                pool, str(tmp_path / f"out{len(steps)}"))
        assert f["kept_unique"] == 0, steps     # dedup keeps the first copies, which the regex then drops
