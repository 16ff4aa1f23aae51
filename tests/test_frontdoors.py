"""The three front doors together (issue #16): every `dvc exp run` point, bare `dvc repro`,
`winnow run` and Prefect run is one MLflow parent run that MLflow's compare view and `winnow
compare` can tell apart; the report is current and says where it came from; a clean clone
reproduces the committed dvc.lock's pool. Real DVC, real MLflow store, in throwaway git repos."""
import json
import re

import pytest
import yaml

from tests.helpers import POINTS, ROOT, copy_project, dvc, make_project, winnow

pytestmark = pytest.mark.slow


def _client(project):
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{project}/mlflow.db")
    return client, client.get_experiment_by_name("winnow-test").experiment_id


def _parents(project) -> dict:
    client, exp = _client(project)
    runs = client.search_runs([exp], filter_string="tags.`winnow.kind` = 'pipeline'")
    names = [r.info.run_name for r in runs]
    assert len(names) == len(set(names)), f"an execution split into several parents: {sorted(names)}"
    return {r.info.run_name: r for r in runs}


def _children(project, parent_id: str) -> dict:
    client, exp = _client(project)
    runs = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {r.data.tags["winnow.stage"]: r for r in runs}


def test_each_experiment_point_is_one_parent_run(swept_project):
    parents = _parents(swept_project)
    client, _ = _client(swept_project)
    exp_show = json.loads(dvc(swept_project, "exp", "show", "--json", check=True).stdout)
    shown = {point["name"]: point for baseline in exp_show for exp in baseline.get("experiments") or []
             for point in exp["revs"]}
    for name, recipe in POINTS:
        p = parents[name]
        assert p.info.status == "FINISHED"
        assert p.data.params["recipe"] == recipe and p.data.params["dvc.experiment"] == name
        assert p.data.tags["winnow.dvc_experiment"] == name and p.data.tags["winnow.recipe"] == recipe
        # the headline equals what DVC recorded for the same point
        metrics = shown[name]["data"]["metrics"]["reports/metrics.json"]["data"]
        for key in ("average", "subset_size", "samples_seen", "kept_fraction"):
            assert p.data.metrics[key] == pytest.approx(metrics[key]), (name, key)
        assert p.data.metrics["group.ImageNet"] == pytest.approx(metrics["group"]["ImageNet"])
        assert {a.path for a in client.list_artifacts(p.info.run_id, "report")} == {"report/index.html",
                                                                                  "report/index.md"}
        kids = _children(swept_project, p.info.run_id)
        assert sorted(kids) == sorted(yaml.safe_load((swept_project / "dvc.yaml").read_text())["stages"])
        # pool and tasks did not change with the recipe: DVC skipped them, and they are still children,
        # marked cached. (Other stages may be restored from the run-cache that the session's projects
        # share, when another test already ran them with the same inputs: cached too.)
        cached = {s for s, r in kids.items() if r.data.tags.get("winnow.cached") == "true"}
        assert {"pool", "tasks"} <= cached and "report" not in cached
        if name == POINTS[-1][0]:   # the workspace holds the last point's outputs: cached = their metrics
            for stage in cached:
                record = json.loads((swept_project / f"reports/stages/{stage}.json").read_text())
                assert {k: kids[stage].data.metrics[k] for k in record} == pytest.approx(record), stage
        # a stage that ran logs its artifacts
        want = {"filter": {"funnel.json", "filter/decision_summary.json"}, "train": {"info.json", "curve.json"},
                "scorer": {"scorer.json", "quality.json"}}
        for stage, files in want.items():
            if stage not in cached:
                got = {a.path for under in (None, stage) for a in client.list_artifacts(kids[stage].info.run_id, under)}
                assert files <= got, (name, stage, got)
        # artifacts stay in this project, not in the one it was copied from
        assert p.info.artifact_uri.startswith(f"{swept_project}/mlruns")
    # at least one point really ran filter and train (and so logged their artifacts above)
    assert not all({"filter", "train"} <= {s for s, r in _children(swept_project, parents[n].info.run_id).items()
                                           if r.data.tags.get("winnow.cached")} for n, _ in POINTS)


def test_compare_lists_both_points_by_recipe_and_creates_no_run(swept_project, tmp_path):
    project = copy_project(swept_project, tmp_path / "project")
    client, exp = _client(project)
    before = len(client.search_runs([exp]))
    proc = winnow(project, "compare")
    assert len(client.search_runs([exp])) == before
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| pt-")]
    by_name = {r.split(" (")[0].strip("| "): [c.strip() for c in r.strip("|").split("|")] for r in rows}
    assert {n: cells[1] for n, cells in by_name.items()} == {"pt-basic": "basic", "pt-nofilter": "no_filter"}
    assert all(cells[3] == n for n, cells in by_name.items())          # the experiment column


def test_a_repro_from_the_cache_is_a_parent_of_cached_stages_and_no_new_model(swept_project, tmp_path):
    """`dvc repro` after the sweep runs nothing but the check and the report (both always run): the
    new parent has every stage as a child (cached ones marked), the same headline, and `winnow
    compare` still has one row per model."""
    project = copy_project(swept_project, tmp_path / "project")
    rows_before = winnow(project, "compare").stdout.count("\n| ")
    dvc(project, "repro", check=True)
    repro = _parents(project)["dvc-repro"]
    kids = _children(project, repro.info.run_id)
    assert sorted(s for s, r in kids.items() if r.data.tags.get("winnow.cached")) == sorted(set(kids) - {"check", "report"})
    assert repro.data.params["recipe"] == "basic"    # the last point's results are in the workspace
    assert repro.data.metrics["average"] == pytest.approx(_parents(project)["pt-basic"].data.metrics["average"])
    assert winnow(project, "compare").stdout.count("\n| ") == rows_before
    assert repro.info.artifact_uri.startswith(f"{project}/mlruns")   # the copy's store writes into the copy


def test_the_report_is_current_and_says_where_it_came_from(swept_project):
    md = (swept_project / "reports/index.md").read_text()
    parent = _parents(swept_project)["pt-basic"]
    assert "## Run" in md and f"| MLflow run | {parent.info.run_id} |" in md
    assert "| DVC experiment | pt-basic |" in md and "| scale | micro |" in md and "| pool source | demo: data/pool |" in md
    assert "DataComp basic filtering" in md                                     # the recipe's description
    nofilter = _parents(swept_project)["pt-nofilter"]
    delta = parent.data.metrics["average"] - nofilter.data.metrics["average"]
    assert f"| Δ average vs no_filter (pt-nofilter, {nofilter.info.run_id[:8]}) | {delta:+.3f} |" in md
    earlier = md.split("## Earlier runs")[1]
    assert "pt-nofilter" in earlier and "| pipeline (" in earlier                # read now, not restored
    funnel = json.loads((swept_project / "reports/filter/funnel.json").read_text())
    truth = md.split("## What each step removed")[1].split("##")[0]
    order = [line.split("|")[1].strip() for line in truth.splitlines() if line.startswith("| ")][1:]
    assert order == [s["step"] for s in funnel["steps"]] + ["recipe"]          # recipe order, then the whole
    params = [line.split("|")[2] for line in md.split("## Funnel")[1].split("##")[0].splitlines()
              if line.startswith("| ")][1:]
    assert "min_side=200" in params[0] and not any(re.search(r"\d\.\d{4,}", p) for p in params), params


def test_dvc_metrics_hold_only_the_headline(swept_project):
    shown = json.loads(dvc(swept_project, "metrics", "show", "--json", check=True).stdout)
    files = {f for rev in shown.values() for f in rev["data"]}
    assert files == {"reports/metrics.json"}
    diff = dvc(swept_project, "metrics", "diff", "HEAD", check=True)      # HEAD's metrics load (committed, cache: false)
    assert "average" in diff.stdout


def test_a_clean_clone_reproduces_the_committed_lock_to_the_scorer(tmp_path, monkeypatch):
    """A fresh project with the shipped params.yaml, on one BLAS thread, writes a data/pool and a
    models/scorer whose DVC hashes are the committed dvc.lock's. The lock was written on another
    machine than the one running this (a CPU of its own), so this is where torch's pinned kernels
    (winnow.kernels) are checked across machines; test_determinism varies threads and kernels at
    micro size."""
    import torch

    from winnow.kernels import _has_avx2

    # the scorer's bytes are pinned for CPU training on x86 with AVX2 (winnow.kernels); a GPU trains
    # in bf16 and other CPUs run their own kernels, so there only the pool is compared
    stages = ("pool", "scorer") if _has_avx2() and not torch.cuda.is_available() else ("pool",)

    def outs(lockfile):
        lock = yaml.safe_load(lockfile.read_text())["stages"]
        return {o["path"]: o["md5"] for stage in stages for o in lock[stage]["outs"]}

    proj = make_project(tmp_path / "clone", yaml.safe_load((ROOT / "params.yaml").read_text()))
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(k, "1")
    dvc(proj, "repro", stages[-1], check=True)
    got, committed = outs(proj / "dvc.lock"), outs(ROOT / "dvc.lock")
    assert "data/pool" in got and ("models/scorer" in got) == ("scorer" in stages)
    assert {k: v for k, v in got.items() if committed.get(k) != v} == {}


def _tree(project, paths=("data/pool", "data/filter", "models/clip", "reports/eval")) -> dict:
    import hashlib

    return {str(f.relative_to(project)): hashlib.sha256(f.read_bytes()).hexdigest()
            for p in paths for f in sorted((project / p).rglob("*")) if f.is_file()}


BAD = [({"train": {"scale": "huge"}}, "huge"),
       ({"filter": {"recipe": "basik"}}, "basik"),
       ({"pool": {"source": "datacomp", "uri": "does/not/exist"}}, "does/not/exist")]


@pytest.mark.parametrize("change,named", BAD, ids=["scale", "recipe", "pool.uri"])
def test_a_bad_value_destroys_nothing(project, change, named, monkeypatch):
    """Through every door: `winnow run` and `dvc repro` (params.yaml as the user wrote it), a
    `dvc exp run -S` point, and a Prefect run (params.yaml put back byte for byte)."""
    from tests.helpers import env_for_subprocess, read_params, write_params

    before = _tree(project)
    good = (project / "params.yaml").read_bytes()
    params = read_params(project)
    for section, values in change.items():
        params[section].update(values)
    write_params(project, params)
    edited = (project / "params.yaml").read_bytes()
    proc = winnow(project, "run", check=False)
    assert proc.returncode == 2 and named in proc.stderr, proc.stderr[-2000:]
    proc = dvc(project, "repro")
    assert proc.returncode != 0 and "failed to reproduce 'check'" in proc.stderr and named in proc.stdout + proc.stderr
    assert (project / "params.yaml").read_bytes() == edited and _tree(project) == before
    (project / "params.yaml").write_bytes(good)
    sets = [f"{k}.{f}={v}" for k, vs in change.items() for f, v in vs.items()]
    proc = dvc(project, "exp", "run", *[x for s in sets for x in ("-S", s)])
    assert proc.returncode != 0 and "failed to reproduce 'check'" in proc.stderr
    assert _tree(project) == before                 # (DVC itself leaves the -S values in params.yaml)
    (project / "params.yaml").write_bytes(good)
    if "filter" in change or "train" in change:     # the flow's parameters: recipe, scale
        from flows.pipeline import pipeline

        monkeypatch.chdir(project)
        monkeypatch.setenv("PATH", env_for_subprocess()["PATH"])
        kwargs = {"recipe": change["filter"]["recipe"]} if "filter" in change else {"scale": change["train"]["scale"]}
        state = pipeline(**kwargs, return_state=True)
        assert state.is_failed()
        assert (project / "params.yaml").read_bytes() == good and _tree(project) == before
