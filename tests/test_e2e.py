"""End to end on a tiny demo in a throwaway git repo: `winnow run` (dvc repro under an MLflow
parent run), DVC caching, partial re-runs, and the same DAG as a Prefect flow."""
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import MICRO_PARAMS, dvc, env_for_subprocess, make_project

pytestmark = pytest.mark.slow
STAGES = ["pool", "tasks", "plan", "scorer", "embed", "filter", "reshard", "train", "evaluate", "report"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    proj = make_project(tmp_path_factory.mktemp("e2e"), MICRO_PARAMS)
    proc = subprocess.run([sys.executable, "-m", "winnow", "run"], cwd=proj, env=env_for_subprocess(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "report: " in proc.stdout and "index.html" in proc.stdout
    return proj


def ran(proc) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in proc.stdout]


def test_outputs_exist_and_pass_gates(project):
    from winnow.pool import uids as U

    for stage in STAGES:
        v = json.loads((project / f"reports/validation/{stage}.json").read_text())
        assert v["success"] and v["rules"] >= 1, stage
    subset = U.load(project / "data/filter/uids.npy")
    funnel = json.loads((project / "reports/filter/funnel.json").read_text())
    assert len(subset) == funnel["subset_size"] == funnel["kept_unique"]
    assert 0.25 <= funnel["kept_fraction"] <= 0.35
    assert set(funnel["truth"]["recipe"]) >= {"clean", "mismatched", "scene_text"}
    meta = json.loads((project / "data/subset/meta.json").read_text())
    assert meta["output_count"] == len(subset)
    emb = np.load(project / "data/embed/00000000.npz")
    assert set(emb.files) == {"scorer_img", "scorer_txt"}   # only what clip_score_top30 needs: no mirrored images
    summary = json.loads((project / "reports/eval/summary.json").read_text())
    assert set(summary["tasks"]) == {"shapes", "shapes_outline", "counting", "colours", "shape_kinds", "retrieval"}
    assert summary["missing"] == [] and 0 <= summary["average"] <= 1
    rows = [json.loads(x) for x in (project / "reports/eval/results.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == ["shapes", "shapes_outline", "counting", "colours", "shape_kinds", "retrieval"]
    report = (project / "reports/index.md").read_text()
    assert "## Funnel" in report and "mismatched" in report and "average" in report
    metrics = dvc(project, "metrics", "show", "--json", check=True)
    assert "average" in metrics.stdout


def test_mlflow_has_one_parent_with_a_child_per_stage(project):
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{project}/mlflow.db")
    exp = client.get_experiment_by_name("winnow-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("winnow.kind") == "pipeline"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["winnow.stage"] for r in children) == sorted(STAGES)
    by_stage = {r.data.tags["winnow.stage"]: r for r in children}
    assert "average" in by_stage["evaluate"].data.metrics
    assert "kept_fraction" in by_stage["filter"].data.metrics
    assert len(client.get_metric_history(by_stage["train"].info.run_id, "train.loss")) >= 2


def test_second_repro_runs_nothing(project):
    proc = dvc(project, "repro", check=True)
    assert ran(proc) == []


def test_filter_change_reruns_only_downstream(project):
    """A filter change re-runs the plan; scorer and embed re-run only when the plan's verdict (what
    must be computed) changes: a new threshold keeps it, a recipe that needs no scorer changes it."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["filter"]["overrides"] = {"clip_score": {"fraction": 0.28}}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = dvc(project, "repro", check=True)
    assert ran(proc) == ["plan", "filter", "reshard", "train", "evaluate", "report"]
    params["filter"]["overrides"] = {}
    params["filter"]["recipe"] = "basic"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = dvc(project, "repro", check=True)
    assert ran(proc) == ["plan", "scorer", "embed", "filter", "reshard", "train", "evaluate", "report"]
    assert json.loads((project / "data/plan/needs.json").read_text()) == {
        "scorer": False, "encode": [], "targets": False, "name": None}
    assert json.loads((project / "data/plan/scorer.json").read_text()) == {"scorer": False}
    assert json.loads((project / "models/scorer/scorer.json").read_text())["model"] is None   # nothing trained
    assert json.loads((project / "data/embed/meta.json").read_text())["keys"] == []
    funnel = json.loads((project / "reports/filter/funnel.json").read_text())
    assert funnel["recipe"] == "basic" and [s["step"] for s in funnel["steps"]] == ["image_size", "caption_length", "language"]


def test_dvc_experiment_reruns_only_downstream(project):
    """`dvc exp run` resets the workspace to the baseline commit: every output must come back from
    the cache (no `cache: false` outputs), or each experiment would re-run the whole pipeline."""
    env = env_for_subprocess()
    subprocess.run(["git", "add", "-A"], cwd=project, env=env, check=True, capture_output=True)
    subprocess.run(["git", "commit", "-qm", "baseline"], cwd=project, env=env, check=True, capture_output=True)
    proc = dvc(project, "exp", "run", "-S", "train.seed=1", "-n", "seed1", check=True)
    assert ran(proc) == ["train", "evaluate", "report"]


def test_prefect_flow_runs_one_task_per_stage(project, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import pipeline

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["filter"]["recipe"] = "no_filter"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(project)
    monkeypatch.setenv("PATH", env_for_subprocess()["PATH"])
    state = pipeline(return_state=True)
    assert state.is_completed(), state
    results = state.result()
    assert list(results) == STAGES
    assert results["pool"] == "skipped" and results["filter"] == "ran"
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        assert sorted(r.name for r in runs) == sorted(STAGES)
        assert all(r.state.is_completed() for r in runs)
        artifacts = client.read_artifacts()
        assert {"funnel", "eval-summary"} <= {a.key for a in artifacts}


def test_every_named_recipe_runs_through_dvc(project):
    from winnow.filters.engine import recipe_names

    from winnow.filters.engine import load_recipe

    for name in recipe_names():
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["filter"]["recipe"] = name
        params["filter"]["targets"] = {}
        for task in load_recipe(name).targets:   # a targets file (DataComp's ImageNet-1k L/14 features on a real pool)
            rng = np.random.default_rng(0)
            np.save(project / f"targets-{task}.npy", rng.standard_normal((64, 768)).astype(np.float32))
            params["filter"]["targets"][task] = f"targets-{task}.npy"
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        proc = dvc(project, "repro", "filter")
        assert proc.returncode == 0, (name, proc.stdout[-2000:], proc.stderr[-3000:])
        funnel = json.loads((project / "reports/filter/funnel.json").read_text())
        assert funnel["recipe"] == name and funnel["subset_size"] >= funnel["kept_unique"] > 0


def test_report_html_renders_in_headless_chromium(project, tmp_path):
    import re
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is installed by `make test` (Debian package)"
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["filter"]["recipe"] = "basic"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = dvc(project, "repro", "report")
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = project / "reports/index.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    images = int(re.search(r'data-images="(\d+)"', dom).group(1))
    broken = int(re.search(r'data-broken-images="(\d+)"', dom).group(1))
    # funnel, 3 "dropped by" grids, the kept grid, 2 evaluation charts, earlier runs
    assert images >= 8 and broken == 0, (images, broken)
    for h in ("Funnel", "What each step removed", "Evaluation", "Earlier runs"):
        assert f"<h2>{h}" in dom
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, "--window-size=1200,2400", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000
    plots = {p.name for p in (project / "reports/plots").iterdir()}
    assert {"funnel.png", "funnel.csv", "eval.csv", "eval_tasks.png", "grid_kept.png"} <= plots
    assert dvc(project, "plots", "show", "--json").returncode == 0


def test_compare_lists_the_runs(project):
    proc = subprocess.run([sys.executable, "-m", "winnow", "compare"], cwd=project, env=env_for_subprocess(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (project / "reports/compare/runs.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| pipeline") or line.startswith("| prefect-pipeline")]
    assert len(rows) >= 2 and "average" in table and "clip_score_top30" in table


def test_served_deployment_runs_on_a_real_prefect_server(project, tmp_path):
    import socket
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
