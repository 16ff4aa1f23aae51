"""End to end on a tiny demo in a throwaway git repo: `winnow run` (dvc repro under an MLflow
parent run), DVC caching, partial re-runs, and the same DAG as a Prefect flow.

The pipeline runs once per session (`built`, tests/conftest.py), which tests only read. A test that edits params or
re-runs stages works in its own copy (`project`), so every test runs alone or in any order. The
copies share one DVC cache, run-cache included: a stage that another copy already ran with the same
inputs is restored from it instead of run again, and `ran` counts it (DVC found it out of date)."""
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.helpers import MICRO_PARAMS, changed_stages, dvc, env_for_subprocess, git, read_params, winnow, write_params

pytestmark = pytest.mark.slow
STAGES = ["pool", "tasks", "plan", "scorer", "embed", "filter", "reshard", "train", "evaluate", "report"]
ALL_STAGES = ["check", *STAGES]   # `check` (the preflight): no gate; always runs (it fingerprints external inputs)
TASKS = ["shapes", "shapes_outline", "counting", "colours", "shape_kinds", "retrieval"]   # configs/tasks/demo.yaml


def ran(proc) -> list[str]:
    return changed_stages(proc, ALL_STAGES)


def set_filter(project, **values) -> None:
    params = read_params(project)
    params["filter"].update(values)
    write_params(project, params)


def subset_uids(project) -> list[str]:
    from winnow.pool import uids as U

    return list(U.array_to_hex(U.load(project / "data/filter/uids.npy")))


def test_outputs_exist_and_pass_gates(built):
    for stage in STAGES:
        v = json.loads((built / f"reports/validation/{stage}.json").read_text())
        assert v["success"] and v["failed"] == 0 and v["checks"] and v["rules"] == len(v["checks"]), stage
        assert all(c["success"] for c in v["checks"]), stage
    # clip_score_top30 is DataComp's rule on the scores the embed stage wrote: keep every sample whose
    # score is >= the score at rank int(0.3 N) of the whole pool
    scores = pd.concat([pd.read_parquet(p) for p in sorted((built / "data/embed").glob("*.parquet"))], ignore_index=True)
    assert len(scores) == MICRO_PARAMS["pool"]["num_samples"]
    s = scores.scorer_score.to_numpy()
    want = sorted(scores.uid[s >= -np.sort(-s)[int(len(s) * 0.3)]])
    subset = subset_uids(built)
    assert subset == want
    funnel = json.loads((built / "reports/filter/funnel.json").read_text())
    assert funnel["subset_size"] == funnel["kept_unique"] == len(want)
    assert funnel["kept_fraction"] == pytest.approx(len(want) / len(s))
    # the recipe's recall / precision per noise kind, recomputed from the pool's labels
    truth = pd.read_parquet(built / "data/pool/truth.parquet")
    dropped = ~truth.uid.isin(subset)
    assert sorted(funnel["truth"]["recipe"]) == sorted(truth.kind.unique())
    for kind, got in funnel["truth"]["recipe"].items():
        mine = truth.kind == kind
        assert got["recall"] == pytest.approx(dropped[mine].mean()), kind
        assert got["precision"] == pytest.approx((dropped & mine).sum() / dropped.sum()), kind
    meta = json.loads((built / "data/subset/meta.json").read_text())
    assert meta["output_count"] == len(subset)
    emb = np.load(built / "data/embed/00000000.npz")
    assert set(emb.files) == {"scorer_img", "scorer_txt"}   # only what clip_score_top30 needs: no mirrored images
    summary = json.loads((built / "reports/eval/summary.json").read_text())
    rows = [json.loads(x) for x in (built / "reports/eval/results.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == TASKS and set(summary["tasks"]) == set(TASKS)
    assert summary["tasks"] == {r["key"]: r["main"] for r in rows}
    assert summary["missing"] == [] and summary["average"] == pytest.approx(np.mean([r["main"] for r in rows]))
    report = (built / "reports/index.md").read_text()
    assert "## Funnel" in report and "mismatched" in report and "average" in report
    metrics = dvc(built, "metrics", "show", "--json", check=True)
    assert "average" in metrics.stdout


def test_mlflow_has_one_parent_with_a_child_per_stage(built):
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{built}/mlflow.db")
    exp = client.get_experiment_by_name("winnow-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("winnow.kind") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["winnow.stage"] for r in children) == sorted(ALL_STAGES)
    assert not any(r.data.tags.get("winnow.cached") for r in children)      # a first run runs every stage
    by_stage = {r.data.tags["winnow.stage"]: r for r in children}
    summary = json.loads((built / "reports/eval/summary.json").read_text())
    assert by_stage["evaluate"].data.metrics["average"] == pytest.approx(summary["average"])
    funnel = json.loads((built / "reports/filter/funnel.json").read_text())
    # the parent: what tells executions apart, the headline, the report; no 47-param dump
    assert parent.info.status == "FINISHED"
    assert parent.data.params["recipe"] == "clip_score_top30" and parent.data.params["scale"] == "micro"
    assert parent.data.params["pool.source"] == "demo" and len(parent.data.params) < 12
    assert parent.data.tags["winnow.git_commit"].startswith(git(built, "rev-parse", "HEAD").stdout.strip())
    assert parent.data.metrics["average"] == pytest.approx(summary["average"])
    assert parent.data.metrics["subset_size"] == funnel["subset_size"]
    assert parent.data.metrics["kept_fraction"] == pytest.approx(funnel["kept_fraction"])
    assert parent.data.metrics["samples_seen"] == summary["model"]["samples_seen"]
    assert {k for k in parent.data.metrics if k.startswith("group.")} == {f"group.{g}" for g in summary["groups"]}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert artifacts == {"report/index.html", "report/index.md"}
    assert json.loads((built / "reports/metrics.json").read_text())["subset_size"] == funnel["subset_size"]
    assert by_stage["filter"].data.metrics["kept_fraction"] == pytest.approx(funnel["kept_fraction"])
    # one loss per optimizer step (samples seen / batch size of the micro scale), as the curve on disk has them
    scale = yaml.safe_load((built / "configs/scales.yaml").read_text())["micro"]
    curve = json.loads((built / "models/clip/curve.json").read_text())
    assert len(curve) == scale["samples_seen"] // scale["batch_size"]
    history = client.get_metric_history(by_stage["train"].info.run_id, "train.loss")
    assert sorted((m.step, m.value) for m in history) == [(r["samples"], r["loss"]) for r in curve]


def test_second_repro_runs_only_the_check_and_the_report(project):
    """The report reads MLflow, which DVC cannot hash, and the check fingerprints what params.yaml
    names outside DVC's view: both always run; nothing else does (the fingerprints are unchanged)."""
    proc = dvc(project, "repro", check=True)
    assert ran(proc) == ["check", "report"]


def test_an_edited_file_a_recipe_reads_from_outside_the_project_reruns_the_filter(project, tmp_path):
    """text_entity's word list given as a path DVC does not track: editing it re-ran nothing and the
    subset stayed stale. The check stage fingerprints it (data/check/inputs/filter.json)."""
    words = tmp_path / "words.txt"
    shipped = (project / "configs/text_entity/demo_words.txt").read_text()
    words.write_text(shipped)
    set_filter(project, recipe="text_based", overrides={"text_entity": {"words": str(words)}})
    dvc(project, "repro", "filter", check=True)
    before = subset_uids(project)
    words.write_text(shipped.replace("\nstar\nstars\n", "\n"))            # stars are no longer entities
    proc = dvc(project, "repro", "filter", check=True)
    assert "filter" in ran(proc) and "pool" not in ran(proc)
    after = subset_uids(project)
    assert 0 < len(after) < len(before) and set(after) < set(before)
    proc = dvc(project, "repro", "filter", check=True)                       # unchanged since: not again
    assert ran(proc) == ["check"]


def test_filter_change_reruns_only_downstream(project):
    """A filter change re-runs the plan; scorer and embed re-run only when the plan's verdict (what
    must be computed) changes: a new threshold keeps it, a recipe that needs no scorer changes it."""
    # up to the filter (what runs downstream of a new subset is DVC's own business: the subset's
    # consumer is stale, as `dvc status` says; test_dvc_experiments_rerun_only_downstream runs it all)
    set_filter(project, overrides={"clip_score": {"fraction": 0.28}})
    proc = dvc(project, "repro", "filter", check=True)
    assert ran(proc) == ["check", "plan", "filter"]
    assert set(json.loads(dvc(project, "status", "--json", check=True).stdout)) == {"check", "reshard", "report"}
    set_filter(project, overrides={}, recipe="basic")
    proc = dvc(project, "repro", "filter", check=True)
    assert ran(proc) == ["check", "plan", "scorer", "embed", "filter"]
    assert json.loads((project / "data/plan/needs.json").read_text()) == {
        "scorer": False, "encode": [], "targets": False, "name": None}
    assert json.loads((project / "data/plan/scorer.json").read_text()) == {"scorer": False}
    assert json.loads((project / "models/scorer/scorer.json").read_text())["model"] is None   # nothing trained
    assert json.loads((project / "data/embed/meta.json").read_text())["keys"] == []
    funnel = json.loads((project / "reports/filter/funnel.json").read_text())
    assert funnel["recipe"] == "basic" and [s["step"] for s in funnel["steps"]] == ["image_size", "caption_length", "language"]


def test_dvc_experiments_rerun_only_downstream(swept):
    """Each `dvc exp run` point re-runs only what its recipe changes; pool and tasks come back from
    the cache (no `cache: false` outputs upstream). no_filter needs no scorer, so the plan's verdict
    changes and scorer and embed re-run; basic after it needs none either, so they do not."""
    _, procs = swept
    assert ran(procs["pt-nofilter"]) == ["check", "plan", "scorer", "embed", "filter", "reshard", "train", "evaluate",
                                         "report"]
    assert ran(procs["pt-basic"]) == ["check", "plan", "filter", "reshard", "train", "evaluate", "report"]


def test_prefect_flow_runs_one_task_per_stage(project, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import pipeline

    set_filter(project, recipe="no_filter")
    monkeypatch.chdir(project)
    monkeypatch.setenv("PATH", env_for_subprocess()["PATH"])
    state = pipeline(return_state=True)
    assert state.is_completed(), state
    results = state.result()
    assert list(results) == ALL_STAGES
    # filter ran, or DVC restored it from its run-cache (an earlier test of the module ran no_filter)
    assert results["pool"] == "skipped" and results["filter"] in ("ran", "cached")
    this_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=this_run)
        assert sorted(r.name for r in runs) == sorted(ALL_STAGES)
        assert all(r.state.is_completed() for r in runs)
        artifacts = {a.key: a for a in client.read_artifacts(flow_run_filter=this_run)}
    assert set(artifacts) == {"funnel", "eval-summary", "runs"}
    funnel = json.loads((project / "reports/filter/funnel.json").read_text())
    assert funnel["recipe"] == "no_filter" and funnel["steps"] == []
    assert json.loads(artifacts["funnel"].data) == [{"step": "pool", "kept": funnel["pool_size"], "dropped": 0}]
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{project}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("winnow-test").experiment_id])
    assert sorted(r.info.run_name for r in runs if r.data.tags.get("winnow.kind") == "pipeline") == [
        "pipeline", "prefect-pipeline"]                                     # the built project's, then the flow's


def test_every_named_recipe_runs_through_its_stages(project, monkeypatch):
    """Each named recipe through check, plan, scorer, embed and filter: the stages' own entry points,
    in this process (DVC's wiring of them is what the other tests here run; one stage process costs
    ~5 s of imports, mostly Great Expectations')."""
    import importlib

    from winnow.filters.engine import load_recipe, recipe_names
    from winnow.stage import main

    def use(name):
        targets = {}
        for task in load_recipe(name).targets:   # a targets file (DataComp's ImageNet-1k L/14 features on a real pool)
            rng = np.random.default_rng(0)
            np.save(project / f"targets-{task}.npy", rng.standard_normal((64, 768)).astype(np.float32))
            targets[task] = f"targets-{task}.npy"
        set_filter(project, recipe=name, targets=targets)

    def run(stage):
        main(stage, importlib.import_module(f"stages.{stage}").body)

    def plan_says(what):
        return (project / f"data/plan/{what}.json").read_text()

    monkeypatch.chdir(project)
    last = {"scorer": plan_says("scorer"), "needs": plan_says("needs")}     # what the built project's stages ran on
    scorer = {}
    for name in recipe_names():
        use(name)
        run("plan")
        scorer[name] = json.loads(plan_says("scorer"))["scorer"]
    # the recipes that need the scorer first (the built project's is trained); as DVC would, scorer
    # and embed re-run only when the plan's verdict for them changes
    for name in sorted(recipe_names(), key=lambda n: not scorer[n]):
        use(name)
        run("check")
        run("plan")
        scorer_ran = plan_says("scorer") != last["scorer"]
        if scorer_ran:
            run("scorer")
        if scorer_ran or plan_says("needs") != last["needs"]:
            run("embed")
        last = {"scorer": plan_says("scorer"), "needs": plan_says("needs")}
        run("filter")
        funnel = json.loads((project / "reports/filter/funnel.json").read_text())
        uids = subset_uids(project)
        assert funnel["recipe"] == name and funnel["pool_size"] == MICRO_PARAMS["pool"]["num_samples"], name
        assert funnel["subset_size"] == len(uids) and funnel["kept_unique"] == len(set(uids)), name
        kept = funnel["steps"][-1]["kept_after"] if funnel["steps"] else funnel["pool_size"]
        assert funnel["kept_unique"] == kept, name


def test_report_html_renders_in_headless_chromium(project, tmp_path):
    import re
    import shutil
    import subprocess

    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is installed by `make test` (Debian package)"
    set_filter(project, recipe="basic")
    proc = dvc(project, "repro", "report")
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = project / "reports/index.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    images = int(re.search(r'data-images="(\d+)"', dom).group(1))
    broken = int(re.search(r'data-broken-images="(\d+)"', dom).group(1))
    # every figure the report wrote is on the page, and the browser decoded each one
    plots = {p.name for p in (project / "reports/plots").iterdir()}
    pngs = {p for p in plots if p.endswith(".png")}
    assert (images, broken) == (page.read_text().count("<img "), 0) and images == len(pngs)
    steps = [s["step"] for s in json.loads((project / "reports/filter/funnel.json").read_text())["steps"]]
    assert steps == ["image_size", "caption_length", "language"]
    # the committed ablation (reports/compare/ablation.json) travels with the project and is charted
    ablation = (project / "reports/compare/ablation.json").is_file()
    assert {"funnel.png", "grid_kept.png", "eval_tasks.png", "eval_groups.png", "earlier_runs.png"} | {
        f"grid_dropped_{s}.png" for s in steps} | ({"ablation.png"} if ablation else set()) == pngs
    assert {"funnel.csv", "eval.csv"} <= plots                           # basic has no score histograms
    for h in ("Funnel", "What each step removed", "Evaluation", "Earlier runs") + (("Ablation",) if ablation else ()):
        assert f"<h2>{h}" in dom
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, "--window-size=1200,2400", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120)
    with Image.open(shot) as img:
        assert img.size == (1200, 2400)
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 24)) > 1     # not a blank page
    assert dvc(project, "plots", "show", "--json").returncode == 0


def test_served_deployment_runs_on_a_real_prefect_server(project, tmp_path):
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = env_for_subprocess() | {"PREFECT_HOME": str(tmp_path / "prefect"),
                                  "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
                                  "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    bindir = env["PATH"].split(":")[0]
    server = subprocess.Popen([f"{bindir}/prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    serve = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("prefect server did not come up")
        serve = subprocess.Popen([sys.executable, "-m", "flows.serve", "--name", "winnow-test", "--cron", "0 3 * * *"],
                                 cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        name = "winnow-pipeline/winnow-test"
        while time.time() < deadline:
            insp = subprocess.run([f"{bindir}/prefect", "deployment", "inspect", name], env=env, capture_output=True, text=True)
            if insp.returncode == 0:
                break
            time.sleep(2)
        assert insp.returncode == 0, insp.stderr
        assert "0 3 * * *" in insp.stdout   # the cron schedule is registered
        run = subprocess.run([f"{bindir}/prefect", "deployment", "run", name, "-p", "recipe=basic", "--watch",
                              "--watch-timeout", "600"], env=env, capture_output=True, text=True, timeout=660)
        assert run.returncode == 0 and "Completed" in run.stdout + run.stderr, run.stdout[-3000:] + run.stderr[-3000:]
        assert read_params(project)["filter"]["recipe"] == "basic"          # the run's parameter reached params.yaml
        funnel = json.loads((project / "reports/filter/funnel.json").read_text())
        assert funnel["recipe"] == "basic"
    finally:
        for p in (serve, server):
            if p is not None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
