"""The preflight (winnow.preflight) names every value that would fail inside a stage, before DVC
removes any output: unknown scale, missing external pool (local or S3), unknown recipe, a recipe
column the pool's schema lacks, noise fractions that leave no clean sample, a YAML syntax error.
The `check` stage runs it first under DVC, so `dvc repro` / `dvc exp run -S` with such a value
fails there and leaves the last good outputs (and params.yaml) as they were."""
import copy
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers import (MICRO_PARAMS, ROOT, copy_project, dvc, env_for_subprocess, git, make_project,
                           read_params, write_params)
from winnow import dvcfile, preflight
from winnow.workspace import check_workspace
from winnow.config import ParamsError


def params(**sections) -> dict:
    p = copy.deepcopy(MICRO_PARAMS)
    for key, value in sections.items():
        p[key] = p.get(key, {}) | value
    return p


def one(problems: list[str], *words: str) -> str:
    assert len(problems) == 1, problems
    assert all(w in problems[0] for w in words), problems
    return problems[0]


def test_good_params_have_no_problem():
    assert preflight.check(MICRO_PARAMS) == []
    assert preflight.check(yaml.safe_load((ROOT / "params.yaml").read_text())) == []


def test_unknown_scale():
    one(preflight.check(params(train={"scale": "huge"})), "train.scale 'huge'", "micro")


def test_unknown_recipe():
    one(preflight.check(params(filter={"recipe": "basik"})), "filter.recipe 'basik'", "basic")


def test_unknown_models_and_negative_seeds():
    """Values that used to pass the check and then fail inside the pool or scorer stage, after DVC had
    removed its outputs (found by a new-user acceptance run)."""
    one(preflight.check(params(scorer={"model": "ViT-Nope"})), "scorer.model", "ViT-Nope")
    one(preflight.check(copy.deepcopy(MICRO_PARAMS) | {"seed": -1}), "seed")
    one(preflight.check(params(train={"seed": -1})), "train.seed")


def test_compare_never_creates_a_tracking_store(tmp_path):
    from winnow.compare import runs_table

    assert runs_table(f"sqlite:///{tmp_path}/mlflow.db", "winnow") == []
    assert not (tmp_path / "mlflow.db").exists()


def test_unknown_suite():
    one(preflight.check(params(eval={"suite": "nope"})), "eval.suite 'nope'", "datacomp38")


def test_noise_fractions_must_leave_clean_samples():
    one(preflight.check(params(pool={"noise": {"mismatched": 0.6, "non_english": 0.5}})), "pool.noise", "sum")
    # rounded per-kind counts of a small pool can leave none even below 1 (the demo pool's own rule)
    tiny = params(pool={"num_samples": 7, "noise": {k: 0.13 for k in ("mismatched", "non_english", "scene_text",
                                                                     "uninformative", "bad_size", "exact_duplicate",
                                                                     "near_duplicate")}})
    one(preflight.check(tiny), "no clean sample")


def test_recipe_column_the_demo_pool_lacks():
    inline = {"name": "x", "steps": [{"step": "clip_score", "score": "no_such_score", "threshold": 0.1}]}
    one(preflight.check(params(filter={"recipe": inline})), "needs column 'no_such_score'", "clip_b32_similarity_score")
    emb = {"name": "x", "steps": [{"step": "clip_score", "embeddings": ["zz_img", "zz_txt"], "threshold": 0.1}]}
    assert len(preflight.check(params(filter={"recipe": emb}))) == 2
    made = {"name": "x", "steps": [{"step": "clip_score", "score": "scorer_score", "threshold": 0.1}]}
    assert preflight.check(params(filter={"recipe": made})) == []      # the embed stage makes it


def test_demo_schema_is_the_demo_pools(demo_pool):
    columns, keys = preflight._demo_schema()
    assert set(pq.read_schema(demo_pool / "00000000.parquet").names) == columns
    import numpy as np

    with np.load(demo_pool / "00000000.npz") as z:
        assert set(z.files) == keys


def _external_pool(root, columns=("uid", "text", "original_width", "original_height")):
    root.mkdir(parents=True)
    pq.write_table(pa.table({c: pa.array(["a"]) for c in columns}), root / "00000000.parquet")
    return root


def test_external_pool_must_exist(tmp_path):
    missing = params(pool={"source": "datacomp", "uri": str(tmp_path / "nowhere")})
    one(preflight.check(missing), "pool.uri", "nowhere", "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    one(preflight.check(params(pool={"source": "datacomp", "uri": str(empty)})), "no {n:08d}.parquet shards")


def test_recipe_columns_against_an_external_pool_schema(tmp_path):
    pool = _external_pool(tmp_path / "pool")
    p = params(pool={"source": "datacomp", "uri": str(pool)}, filter={"recipe": "basic"})
    assert preflight.check(p) == []                                     # basic reads caption and sizes only
    p["filter"]["recipe"] = "clip_l14_top30"                             # reads the pool's own L/14 score
    one(preflight.check(p), "needs column 'clip_l14_similarity_score'", "pool columns: original_height")
    p["filter"]["recipe"] = {"name": "x", "steps": [{"step": "clip_score", "embeddings": ["l14_img", "l14_txt"],
                                                     "threshold": 0.1}]}
    assert len(preflight.check(p)) == 2 and "needs embedding 'l14_img'" in preflight.check(p)[0]   # no npz
    import numpy as np

    np.savez(pool / "00000000.npz", l14_img=np.zeros((1, 4), np.float16), l14_txt=np.zeros((1, 4), np.float16))
    assert preflight.check(p) == []
    p["filter"]["recipe"] = "clip_l14_top30"
    # DataComp's download layout: metadata/<hex>.parquet (+ the derived `downloaded` column)
    dl = tmp_path / "dl"
    _external_pool(dl / "metadata", ("uid", "text", "clip_l14_similarity_score"))
    (dl / "metadata" / "00000000.parquet").rename(dl / "metadata" / "0a1b2c.parquet")
    p["pool"]["uri"] = str(dl)
    assert preflight.check(p) == []


def test_external_pool_on_s3(s3_server, tmp_path):
    from tests.s3server import BUCKET
    from winnow import s3

    pool = _external_pool(tmp_path / "pool")
    s3.upload(pool / "00000000.parquet", f"s3://{BUCKET}/preflight/pool/00000000.parquet")
    p = params(pool={"source": "datacomp", "uri": f"s3://{BUCKET}/preflight/pool"}, filter={"recipe": "basic"},
               storage={"endpoint_url": s3_server.endpoint})
    assert preflight.check(p) == []
    p["pool"]["uri"] = f"s3://{BUCKET}/preflight/nowhere"
    one(preflight.check(p), "s3://", "nowhere")


def test_run_applies_updates_without_writing(tmp_path):
    path = tmp_path / "params.yaml"
    write_params(tmp_path, MICRO_PARAMS)
    before = path.read_bytes()
    assert preflight.run(path, {"filter.recipe": "basic"}).filter.recipe == "basic"
    with pytest.raises(ParamsError, match="filter.recipe 'basik'") as e:
        preflight.run(path, {"filter.recipe": "basik", "train.scale": "huge"})
    assert "2 problems" in str(e.value) and "train.scale 'huge'" in str(e.value)
    with pytest.raises(ParamsError, match="cannot set 'train.nope'"):
        preflight.run(path, {"train.nope": 1})
    assert path.read_bytes() == before
    assert e.value.exit_code == 2


def _env() -> dict:
    return env_for_subprocess() | {"PYTHONPATH": str(ROOT)}   # this checkout's winnow, run from elsewhere


BROKEN = "seed: 0\npool:\n  source: demo\n   uri: data/pool\n"   # line 4 indented one column too far


def test_yaml_syntax_error_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text(BROKEN)
    problems = preflight.load(tmp_path / "params.yaml")[1]
    assert len(problems) == 1 and problems[0].startswith(f"{tmp_path / 'params.yaml'}:4:"), problems
    proc = subprocess.run([sys.executable, "-m", "winnow", "check"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(err) <= 3, proc.stderr
    assert any(line.strip().startswith("params.yaml:4:") for line in err), proc.stderr


def test_stages_exit_2_on_a_config_error(tmp_path):
    """The check stage and a stage.main stage (plan): a config error is exit 2, one clear message."""
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    (tmp_path / "params.yaml").write_text(BROKEN)
    for stage in ("check", "plan"):
        proc = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=tmp_path, env=_env(),
                              capture_output=True, text=True)
        assert proc.returncode == 2, (stage, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and "params.yaml:4:" in proc.stderr, proc.stderr
    write_params(tmp_path, params(train={"scale": "huge"}))
    proc = subprocess.run([sys.executable, "-m", "stages.check"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "train.scale 'huge'" in proc.stderr
    assert not (tmp_path / preflight.VERDICT).exists()


# --- under DVC: a bad value stops at `check`, before any stage removes its outputs ----------------

def _fake_outputs(proj) -> None:
    """Every stage's outputs as marker files, committed to dvc.lock as if the stages had run (only
    `check` really runs): what a bad value must leave alone."""
    for stage in dvcfile.stages(proj / "dvc.yaml"):
        if stage == "check":
            continue
        for out in dvcfile.outputs(stage, proj / "dvc.yaml") + dvcfile.deps(stage, proj / "dvc.yaml"):
            o = proj / out
            if out.split("/")[0] not in ("data", "models", "reports") or o.exists():
                continue
            if o.suffix:
                o.parent.mkdir(parents=True, exist_ok=True)
                o.write_text(f"{stage}: {out}\n")
            else:
                o.mkdir(parents=True)
                (o / "marker").write_text(f"{stage}: {out}\n")


@pytest.fixture(scope="module")
def committed(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    proj = make_project(root / "proj", MICRO_PARAMS, dvc_cache=root / "dvc-cache")
    dvc(proj, "repro", "check", check=True)
    _fake_outputs(proj)
    dvc(proj, "commit", "-f", check=True)
    status = dvc(proj, "status", check=True).stdout
    assert status.split() == ["check:", "always", "changed", "report:", "always", "changed"], status   # always_changed
    git(proj, "add", "-A")
    git(proj, "commit", "-qm", "built")
    return proj


KEPT = ["data/pool/marker", "data/plan/marker", "data/filter/marker", "data/subset/marker", "models/clip/marker",
        "data/check/verdict.json"]


def _snapshot(proj) -> dict:
    return {p: (proj / p).read_bytes() for p in KEPT if (proj / p).exists()}


def _bad(p: dict, case: str) -> dict:
    if case == "scale":
        p["train"]["scale"] = "huge"
    elif case == "pool_uri":
        p["pool"] |= {"source": "datacomp", "uri": "/nonexistent/datacomp/pool"}
    elif case == "recipe_column":
        p["filter"]["recipe"] = {"name": "x", "steps": [{"step": "clip_score", "score": "no_such_score", "threshold": 0.1}]}
    elif case == "noise":
        p["pool"]["noise"] = {"mismatched": 0.7, "non_english": 0.5}
    elif case == "recipe":
        p["filter"]["recipe"] = "basik"
    return p


@pytest.mark.slow
@pytest.mark.parametrize("case,stage", [("scale", "train"), ("pool_uri", "pool"), ("recipe_column", "plan"),
                                        ("noise", "pool"), ("recipe", "plan")])
def test_dvc_repro_with_a_bad_value_keeps_every_output(committed, tmp_path, case, stage):
    proj = copy_project(committed, tmp_path / "proj")
    kept = _snapshot(proj)
    assert len(kept) == len(KEPT)
    write_params(proj, _bad(read_params(proj), case))
    written = (proj / "params.yaml").read_bytes()
    # without `check`, DVC would run this stage (removing its outputs) and fail inside it
    assert f"{stage}:" in dvc(proj, "status", stage).stdout
    proc = dvc(proj, "repro")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "failed to reproduce 'check'" in out and "exited with 2" in out, out[-3000:]
    ran = [s for s in dvcfile.stages(proj / "dvc.yaml") if f"Running stage '{s}'" in out]
    assert ran == ["check"], out[-3000:]
    assert {p: b for p, b in kept.items() if p != "data/check/verdict.json"} == {
        p: (proj / p).read_bytes() for p in kept if p != "data/check/verdict.json"}
    assert (proj / "params.yaml").read_bytes() == written                 # dvc repro never edits params


@pytest.mark.slow
def test_dvc_exp_run_with_a_bad_recipe_keeps_every_output(committed, tmp_path):
    proj = copy_project(committed, tmp_path / "proj")
    kept = _snapshot(proj)
    proc = dvc(proj, "exp", "run", "-S", "filter.recipe=basik")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "filter.recipe 'basik'" in out and "exited with 2" in out, out[-3000:]
    for p, b in kept.items():
        if p != "data/check/verdict.json":
            assert (proj / p).read_bytes() == b, p
    # DVC leaves the failed experiment's value in the workspace's params.yaml (documented, not fought)
    assert read_params(proj)["filter"]["recipe"] == "basik"


_HOLDER = """
import subprocess, sys, time
from winnow.workspace import workspace_lock
with workspace_lock():
    child = subprocess.run([sys.executable, "-c", "from winnow.workspace import check_workspace; check_workspace()"])
    print("child", child.returncode, flush=True)
    time.sleep(60)
"""


def test_a_stage_refuses_a_workspace_another_run_holds_and_runs_under_its_holder(tmp_path):
    """DVC locks paths, not runs: a `dvc exp run` beside a `winnow run` ran its early stages between
    the other's, with its own params. A stage of the holder (its descendant) goes on; any other fails
    at once, naming the holder."""
    import shutil

    holder = subprocess.Popen([sys.executable, "-c", _HOLDER], cwd=tmp_path, env=env_for_subprocess(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().split() == ["child", "0"]      # the holder's own stage
        shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
        shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
        proc = subprocess.run([sys.executable, "-c", "from winnow.stage import main; main('plan', lambda p: {})"],
                              cwd=tmp_path, env=env_for_subprocess(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "WorkspaceBusy" in proc.stderr and f"pid {holder.pid}" in proc.stderr, proc.stderr
        assert not (tmp_path / "mlflow.db").exists()                    # refused before anything was logged
    finally:
        holder.kill()
        holder.wait()
    check_workspace(tmp_path / ".winnow" / "flow.lock")       # released with its holder: free again
