"""A bad pool stops at the pool stage's gate with a clear message; nothing downstream runs."""
import copy
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.helpers import MICRO_PARAMS, dvc, make_project

pytestmark = pytest.mark.slow


def nan_embeddings(pool):
    with np.load(pool / "00000001.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["b32_img"][5] = np.nan
    np.savez(pool / "00000001.npz", **arrays)
    return ["expect_column_values_to_be_in_set", "embeddings_finite", "1 of 600 rows fail"]


def truncated_tar(pool):
    p = pool / "00000002.tar"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return ["tar_readable", "00000002.tar", "tar_error"]


def duplicate_uid(pool):
    t = pq.read_table(pool / "00000000.parquet").to_pandas()
    t.loc[3, "uid"] = t.loc[2, "uid"]
    t.to_parquet(pool / "00000000.parquet", index=False)
    return ["expect_column_values_to_be_unique", "2 of 600 rows fail", t.loc[2, "uid"]]


def missing_column(pool):
    t = pq.read_table(pool / "00000001.parquet")
    pq.write_table(t.drop(["sha256"]), pool / "00000001.parquet")
    return ["missing_columns", "00000001", "sha256"]


def npz_row_mismatch(pool):
    with np.load(pool / "00000001.npz") as z:
        arrays = {k: z[k][:-1] for k in z.files}      # one row fewer than the parquet
    np.savez(pool / "00000001.npz", **arrays)
    return ["expect_column_pair_values_to_be_equal", "00000001"]


def zero_norm_embedding(pool):
    with np.load(pool / "00000002.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["l14_txt"][7] = 0
    np.savez(pool / "00000002.npz", **arrays)
    return ["embeddings_finite", "1 of 600 rows fail"]


@pytest.mark.parametrize("corrupt", [nan_embeddings, truncated_tar, duplicate_uid, missing_column, npz_row_mismatch,
                                     zero_norm_embedding])
def test_bad_pool_stops_at_gate(corrupt, demo_pool, tmp_path):
    bad = tmp_path / "badpool"
    shutil.copytree(demo_pool, bad, ignore=shutil.ignore_patterns("trusted", "truth.parquet", "manifest.json"))
    expected = corrupt(bad)
    params = copy.deepcopy(MICRO_PARAMS)
    params["pool"].update(source="datacomp", uri=str(bad))
    project = make_project(tmp_path / "proj", params)
    proc = dvc(project, "repro")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "gate 'pool' failed" in out
    for piece in expected:
        assert piece in out, f"{piece!r} not in output:\n{out[-3000:]}"
    assert "Running stage 'scorer'" not in out and "Running stage 'tasks'" not in out
    for downstream in ("data/embed", "data/tasks", "models/scorer", "data/filter"):
        assert not (project / downstream).exists()
    assert (project / "reports/validation/pool.json").exists()


def test_good_external_pool_passes_the_gate(demo_pool, tmp_path):
    params = copy.deepcopy(MICRO_PARAMS)
    params["pool"].update(source="datacomp", uri=str(demo_pool))
    project = make_project(tmp_path / "proj", params)
    proc = dvc(project, "repro", "pool")
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    manifest = json.loads((project / "data/pool/manifest.json").read_text())
    assert manifest["source"] == "datacomp" and manifest["shards"] == ["00000000", "00000001", "00000002"]
    assert not (project / "data/pool/00000000.tar").exists()   # referenced, not copied
