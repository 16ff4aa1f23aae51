"""Gates in bounded state: ``Gate.check_stream`` adds up per-frame results exactly as one ``check``
of the whole table would, keeps at most 5 example rows, refuses what cannot be added up; the pool
gate finds duplicate uids across shards through hash partitions, never a pool-wide frame."""
import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from winnow.pool import checks
from winnow.pool.view import Pool
from winnow.validate import EXAMPLES, Gate, GateError, expect


def _table(n: int = 120, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-0.5, 1.5, n)
    x[rng.random(n) < 0.1] = np.nan
    return pd.DataFrame({"uid": [f"{i:032x}" for i in range(n)], "x": x, "y": np.where(rng.random(n) < 0.2, 0.0, x),
                         "tag": rng.choice(["a", "b", None], n, p=[0.7, 0.2, 0.1]), "ok": rng.random(n) < 0.85})


def _rules():
    E = expect()
    return [
        E.ExpectColumnValuesToBeBetween(column="x", min_value=0, max_value=1),
        E.ExpectColumnValuesToBeBetween(column="x", min_value=0, max_value=1, mostly=0.6),
        E.ExpectColumnValuesToBeBetween(column="x", min_value=0, max_value=1, mostly=0.8),
        E.ExpectColumnValuesToBeInSet(column="tag", value_set=["a"], mostly=0.7),
        E.ExpectColumnValuesToNotBeNull(column="tag", mostly=0.85),
        E.ExpectColumnValuesToNotBeNull(column="x"),
        E.ExpectColumnValuesToMatchRegex(column="uid", regex=r"^[0-9a-f]{32}$"),
        E.ExpectColumnValuesToBeInSet(column="ok", value_set=[True], mostly=0.8),
        E.ExpectColumnPairValuesToBeEqual(column_A="x", column_B="y", mostly=0.5),
    ]


def _pick(entries):
    return [{k: e[k] for k in ("rule", "kwargs", "success", "element_count", "unexpected_count")} for e in entries]


def test_stream_adds_up_to_one_check_of_the_concatenation(tmp_path):
    df = _table()
    whole, parts = Gate("w", report_dir=str(tmp_path)), Gate("p", report_dir=str(tmp_path))
    whole.check("t", df, _rules())
    parts.check_stream("t", (df.iloc[a:b] for a, b in [(0, 7), (7, 50), (50, 51), (51, 120)]), _rules())
    assert _pick(parts.checks) == _pick(whole.checks)
    assert len(parts.checks) == len(_rules()) and set(parts.checks[0]) == set(whole.checks[0])
    # the case mixes passing and failing rules, and nulls are missing rows, not failures
    assert {e["success"] for e in parts.checks} == {True, False}
    between = parts.checks[0]
    assert between["element_count"] == 120 and between["unexpected_count"] == ((df.x < 0) | (df.x > 1)).sum()


def test_success_comes_from_the_summed_counts_not_from_each_frame(tmp_path):
    """mostly=0.8: one frame has 60% expected and fails on its own, the two together have 80%."""
    E = expect()
    good = pd.DataFrame({"uid": [f"{i:032x}" for i in range(10)], "ok": [True] * 10})
    bad = pd.DataFrame({"uid": [f"{i:032x}" for i in range(10, 20)], "ok": [True] * 6 + [False] * 4})
    rule = [E.ExpectColumnValuesToBeInSet(column="ok", value_set=[True], mostly=0.8)]
    alone = Gate("a", report_dir=str(tmp_path))
    alone.check("t", bad, rule)
    assert not alone.checks[0]["success"]
    g = Gate("s", report_dir=str(tmp_path))
    g.check_stream("t", [good, bad], rule)
    assert g.checks[0]["success"] and g.checks[0]["unexpected_count"] == 4 and g.checks[0]["element_count"] == 20
    g.check_stream("t", [bad, bad], rule)
    assert not g.checks[1]["success"]


def test_examples_are_capped_and_carry_their_ids(tmp_path):
    E = expect()
    frames = [pd.DataFrame({"uid": [f"{s:02d}{i:030x}" for i in range(50)], "shard": f"{s:08d}", "x": np.full(50, 7.0)})
              for s in range(4)]
    g = Gate("cap", report_dir=str(tmp_path))
    g.check_stream("t", iter(frames), [E.ExpectColumnValuesToBeBetween(column="x", max_value=1)],
                   id_column=["uid", "shard"])
    g.check("t", pd.concat(frames), [E.ExpectColumnValuesToBeBetween(column="x", max_value=1)], id_column="uid")
    streamed, whole = g.checks
    assert streamed["unexpected_count"] == whole["unexpected_count"] == 200
    assert len(streamed["examples"]) == len(whole["examples"]) == EXAMPLES
    assert streamed["examples"][0] == {"x": 7.0, "uid": frames[0].uid[0], "shard": "00000000"}
    assert set(whole["examples"][0]) == {"x", "uid"}
    with pytest.raises(GateError) as e:
        g.finish()
    assert "200 of 200 rows fail" in str(e.value) and frames[0].uid[0] in str(e.value)
    report = json.loads((tmp_path / "cap.json").read_text())
    assert report["rules"] == 2 and all(len(c["examples"]) == EXAMPLES for c in report["checks"])


def test_an_aggregate_expectation_is_refused_before_any_frame_is_read(tmp_path):
    E = expect()
    read = []

    def frames():
        read.append(1)
        yield _table()

    g = Gate("agg", report_dir=str(tmp_path))
    for rule, name in [(E.ExpectColumnDistinctValuesToContainSet(column="tag", value_set=["a"]),
                        "ExpectColumnDistinctValuesToContainSet"),
                       (E.ExpectColumnMeanToBeBetween(column="x", min_value=0), "ExpectColumnMeanToBeBetween"),
                       (E.ExpectColumnValuesToBeUnique(column="uid"), "ExpectColumnValuesToBeUnique")]:
        with pytest.raises(ValueError, match=f"{name} on 't' cannot be checked frame by frame"):
            g.check_stream("t", frames(), [E.ExpectColumnValuesToNotBeNull(column="x"), rule])
    with pytest.raises(ValueError, match="ExpectColumnValuesToBeUnique"):   # partitioned by another column
        g.check_stream("t", frames(), [E.ExpectColumnValuesToBeUnique(column="uid")], partitioned_by="tag")
    assert not read and not g.checks


def test_uniqueness_is_exact_over_hash_partitions(tmp_path):
    E = expect()
    df = _table(60)
    df.loc[[5, 40, 41], "uid"] = df.uid[3]
    parts = [df[df.uid.str[-1].isin(list(h))] for h in ("0123", "4567", "89ab", "cdef")]   # all copies in one
    whole, g = Gate("w", report_dir=str(tmp_path)), Gate("p", report_dir=str(tmp_path))
    whole.check("t", df, [E.ExpectColumnValuesToBeUnique(column="uid")])
    g.check_stream("t", parts, [E.ExpectColumnValuesToBeUnique(column="uid")], partitioned_by="uid")
    assert _pick(g.checks) == _pick(whole.checks) and g.checks[0]["unexpected_count"] == 4


# --- the pool gate -------------------------------------------------------------------------------


def _copy(demo_pool, tmp_path):
    pool_dir = tmp_path / "pool"
    shutil.copytree(demo_pool, pool_dir, ignore=shutil.ignore_patterns("trusted", "truth.parquet"))
    return pool_dir


def _set_uids(pool_dir, shard: str, rows: list[int], uids: list[str]) -> None:
    t = pq.read_table(pool_dir / f"{shard}.parquet").to_pandas()
    t.loc[rows, "uid"] = uids
    t.to_parquet(pool_dir / f"{shard}.parquet", index=False)


def test_a_uid_shared_by_two_shards_fails_the_pool_gate(demo_pool, tmp_path, monkeypatch):
    """Every shard is fine on its own; the pool is not."""
    pool_dir = _copy(demo_pool, tmp_path)
    uid = pq.read_table(pool_dir / "00000000.parquet")["uid"][4].as_py()
    _set_uids(pool_dir, "00000002", [9], [uid])
    pool = Pool.open(str(pool_dir))
    for s in pool.shards:
        gate = Gate("pool", report_dir=str(tmp_path / s))
        checks.check_pool(dataclasses.replace(pool, shards=[s]), gate)
        gate.finish()
    monkeypatch.setattr(checks, "SPILL_AT", 128)     # several spills of every partition, several frames
    monkeypatch.setattr(checks, "FRAME_ROWS", 100)
    gate = Gate("pool", report_dir=str(tmp_path / "all"))
    stats = checks.check_pool(pool, gate)
    with pytest.raises(GateError) as e:
        gate.finish()
    msg = str(e.value)
    assert "expect_column_values_to_be_unique(column=uid) on 'samples': 2 of 600 rows fail" in msg and uid in msg
    unique = next(c for c in gate.checks if c["rule"] == "expect_column_values_to_be_unique")
    assert unique["examples"] == [{"uid": uid, "shard": "00000000"}, {"uid": uid, "shard": "00000002"}]
    assert [c["rule"] for c in gate.failures()] == ["expect_column_values_to_be_unique"]
    assert stats["samples"] == 600 and stats["shards"] == 3


def test_many_duplicates_are_counted_with_five_examples(demo_pool, tmp_path):
    pool_dir = _copy(demo_pool, tmp_path)
    first = pq.read_table(pool_dir / "00000000.parquet")["uid"].to_pylist()
    _set_uids(pool_dir, "00000001", list(range(8)), first[:8])          # 8 uids twice across shards
    _set_uids(pool_dir, "00000002", [0, 1], [first[20], first[20]])     # one three times, twice in a shard
    _set_uids(pool_dir, "00000002", [2], ["not-a-uid"])                 # fails the regex, not uniqueness
    gate = Gate("pool", report_dir=str(tmp_path / "v"))
    checks.check_pool(Pool.open(str(pool_dir)), gate)
    with pytest.raises(GateError):
        gate.finish()
    unique = next(c for c in gate.checks if c["rule"] == "expect_column_values_to_be_unique")
    assert unique["unexpected_count"] == 8 * 2 + 3 and unique["element_count"] == 599
    assert len(unique["examples"]) == EXAMPLES and all(set(x) == {"uid", "shard"} for x in unique["examples"])
    assert {x["uid"] for x in unique["examples"]} <= set(first[:8]) | {first[20]}
    regex = next(c for c in gate.checks if c["rule"] == "expect_column_values_to_match_regex")
    assert regex["unexpected_count"] == 1 and regex["examples"][0]["shard"] == "00000002"
    report = json.loads((tmp_path / "v/pool.json").read_text())
    assert {c["frame"] for c in report["checks"]} == {"samples", "shards"}
    assert sum(c["rule"] == "expect_column_values_to_be_unique" for c in report["checks"]) == 1


def test_task_images_are_looked_up_shard_by_shard(demo_pool):
    from stages.tasks import pool_overlap

    pool = Pool.open(str(demo_pool))
    inside = pq.read_table(demo_pool / "00000001.parquet")["sha256"][7].as_py()
    assert pool_overlap(pool, pd.Series([inside, "0" * 64, inside])) == {inside}
    assert pool_overlap(pool, pd.Series(["0" * 64])) == set()
