"""Near-duplicate removal by embedding cosine: the first of each group (pool order) stays, across
shards and blocks; quarantined (NaN) embeddings are never duplicates. While the survivors fit the
memory budget the result is the row-by-row rule's, bit for bit, for any block size; past it (or forced) the
survivors are partitioned by k-means cluster, which still drops planted copies, deterministically."""
import pickle
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import bench_module
from winnow.filters import build_step
from winnow.filters.engine import load_recipe, run
from winnow.pool import shards
from winnow.pool.view import Pool


def reference(pool: Pool, alive, key: str, threshold: float, block: int) -> tuple[dict, dict]:
    """The rule, row by row in pool order with every kept embedding in memory (``block`` unused: the
    result must not depend on it): a finite row is dropped iff its float16-kept cosine with a row
    kept before it is at least ``threshold``. (shard -> rows to drop, counts)"""
    kept: list[np.ndarray] = []
    drops = {}
    for shard in pool.shards:
        rows = np.flatnonzero(alive(shard))
        e = pool.batch(shard).embedding(key)[rows]
        ok = np.isfinite(e).all(axis=1)
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        drop = []
        for r, x, good in zip(rows, e, ok):
            if not good:
                continue
            earlier = np.stack(kept) if kept else np.zeros((0, len(x)), np.float16)
            if len(earlier) and (np.asarray(x, np.float32) @ earlier.astype(np.float32).T >= threshold).any():
                drop.append(r)
            else:
                kept.append(x.astype(np.float16))
        if drop:
            drops[shard] = np.array(drop)
    return drops, {"unique_images": len(kept), "near_duplicates": int(sum(len(v) for v in drops.values()))}


def write_pool(root, emb: np.ndarray, per_shard: list[int]) -> Pool:
    """A pool of consecutive slices of ``emb`` (key ``img``), with uids and the ``image_size`` columns."""
    root.mkdir(parents=True, exist_ok=True)
    names, start = [], 0
    for k, n in enumerate(per_shard):
        names.append(shards.stem(k))
        pq.write_table(pa.table({"uid": pa.array([f"{start + i:032x}" for i in range(n)], pa.string()),
                                 "original_width": np.full(n, 300), "original_height": np.full(n, 300)}),
                       shards.path(str(root), names[-1], "parquet"))
        shards.write_npz(str(root), names[-1], {"img": emb[start: start + n]})
        start += n
    return Pool(uri=str(root), shards=names, manifest={})


def planted(n: int, dim: int, copies: int, groups: int, seed: int) -> tuple[np.ndarray, dict]:
    """Unit embeddings around ``groups`` directions, and ``copies`` of them re-planted later in the
    pool with a little noise (cosine > 0.99 with the original): (embeddings, copy row -> original row)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((groups, dim))
    e = centres[rng.integers(groups, size=n)] + 0.6 * rng.standard_normal((n, dim))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    src = rng.choice(n // 2, copies, replace=False)
    dst = n // 2 + rng.choice(n - n // 2, copies, replace=False)
    e[dst] = e[src] + 0.01 * rng.standard_normal((copies, dim))
    return e.astype(np.float32), dict(zip(dst.tolist(), src.tolist()))


def dropped_rows(pool: Pool, fitted, per: int) -> list[int]:
    return sorted(int(s) * per + int(r) for s in pool.shards for r in fitted.of(s))


def test_near_duplicates_across_shards_and_blocks(tmp_path):
    bench_module("filter").generate(tmp_path, 300, 3, dim=16)
    rng = np.random.default_rng(0)
    base = rng.standard_normal((300, 16)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    copies = {5: 120, 7: 250, 130: 131, 140: 299}            # original row -> later near copy
    for src, dst in copies.items():
        base[dst] = base[src] + 0.01 * rng.standard_normal(16)
    base[200] = np.nan                                         # a quarantined image
    for k in range(3):
        shards.write_npz(str(tmp_path), shards.stem(k), {"l14_img": base[k * 100:(k + 1) * 100],
                                                         "l14_txt": base[k * 100:(k + 1) * 100]})
    pool = Pool.open(str(tmp_path))
    step = build_step({"step": "dedup_near", "embedding": "l14_img", "threshold": 0.95, "block": 32}, "test")
    fitted = step.fit(pool, lambda shard: np.ones(100, bool))
    assert dropped_rows(pool, fitted, 100) == sorted(copies.values())
    assert step.report(fitted) == {"unique_images": 300 - 4 - 1, "near_duplicates": 4}
    keep = np.concatenate([step.verdict(pool.batch(s), fitted) for s in pool.shards])
    assert keep.sum() == 296 and keep[200]

    forced = build_step({"step": "dedup_near", "embedding": "l14_img", "threshold": 0.95, "block": 32,
                         "partitions": 3}, "test")
    fitted = forced.fit(pool, lambda shard: np.ones(100, bool))
    assert dropped_rows(pool, fitted, 100) == sorted(copies.values())
    assert forced.report(fitted) == {"unique_images": 300 - 4 - 1, "near_duplicates": 4}


@pytest.mark.parametrize("block", [1, 7, 4096])
def test_within_the_budget_equals_the_row_by_row_rule_for_any_block(tmp_path, block):
    """Chains of copies (a copy of a copy), copies within a block and across shards, NaN rows, an
    empty shard and survivors-only masks: the drops and counts are the row-by-row rule's exactly,
    whatever the block (an earlier row of a block counted even when it was itself dropped, so a
    chain A ~ B ~ C lost C at block 4096 and kept it at block 1)."""
    rng = np.random.default_rng(block)
    e = rng.standard_normal((600, 8)).astype(np.float32)
    for i in rng.choice(500, 150, replace=False):              # near copies at random later rows
        e[i + 1 + rng.integers(min(99, 599 - i))] = e[i] + 0.05 * rng.standard_normal(8)
    e[rng.choice(600, 10, replace=False)] = np.nan
    pool = write_pool(tmp_path / "pool", e, [250, 0, 200, 150])
    alive = {s: rng.random(len(pool.batch(s))) < 0.8 for s in pool.shards}
    want, counts = reference(pool, alive.get, "img", 0.9, block)
    assert counts["near_duplicates"] > 50
    for p in (pool, replace(pool, scratch=str(tmp_path / "scratch"))):
        step = build_step({"step": "dedup_near", "embedding": "img", "threshold": 0.9, "block": block}, "test")
        fitted = step.fit(p, alive.get)
        assert step.report(fitted) == counts
        for s in pool.shards:
            np.testing.assert_array_equal(fitted.of(s), np.sort(want.get(s, np.zeros(0, np.int64))))


def test_partitioned_drops_planted_copies_keeps_the_first_and_is_deterministic(tmp_path):
    e, copies = planted(2000, 32, 100, groups=6, seed=1)
    pool = write_pool(tmp_path / "pool", e, [500] * 4)
    alive = {s: np.ones(500, bool) for s in pool.shards}
    whole = build_step({"step": "dedup_near", "embedding": "img", "threshold": 0.97}, "test")
    assert dropped_rows(pool, whole.fit(pool, alive.get), 500) == sorted(copies)     # the planted copies, only
    # a budget below the survivors' 125 KB forces clusters; a later copy is dropped, its original kept
    step = build_step({"step": "dedup_near", "embedding": "img", "threshold": 0.97, "block": 64,
                       "max_memory_mb": 0.05}, "test")
    scratch = replace(pool, scratch=str(tmp_path / "scratch"))
    fits = [step.fit(pool, alive.get), step.fit(scratch, alive.get), step.fit(scratch, alive.get)]
    got = [dropped_rows(pool, f, 500) for f in fits]
    assert got[0] == got[1] == got[2] and [f.counts for f in fits[1:]] == [fits[0].counts] * 2
    assert set(got[0]) <= set(copies) and len(got[0]) >= 95
    assert fits[0].counts == {"unique_images": 2000 - len(got[0]), "near_duplicates": len(got[0])}
    assert not set(copies[c] for c in got[0]) & set(got[0])


def test_partitioned_through_the_engine_and_pickled_small(tmp_path):
    """Thousands of drops: the fitted value is a directory and counts; the engine's decisions are
    the direct fit's."""
    rng = np.random.default_rng(2)
    base = rng.standard_normal((100, 16)).astype(np.float32)
    e = base[rng.integers(100, size=3000)] + 0.01 * rng.standard_normal((3000, 16)).astype(np.float32)
    pool = write_pool(tmp_path / "pool", e, [1000] * 3)
    spec = {"step": "dedup_near", "embedding": "img", "threshold": 0.95, "partitions": 8}
    step = build_step(spec, "test")
    fitted = step.fit(replace(pool, scratch=str(tmp_path / "scratch")), lambda s: np.ones(1000, bool))
    assert fitted.counts["near_duplicates"] >= 2800 and len(pickle.dumps(fitted)) < 10_000
    run(load_recipe({"name": "near", "steps": [spec]}), pool, str(tmp_path / "out"), work_root=str(tmp_path / "work"))
    keep = pq.read_table(tmp_path / "out" / "decisions.parquet")["keep:dedup_near"].to_numpy()
    assert keep.tolist() == np.concatenate([step.verdict(pool.batch(s), fitted) for s in pool.shards]).tolist()
