"""The Prefect flow's seams, on real flow runs over a small DVC project of stub stages: a bad
parameter fails before params.yaml is written; a failure after it puts params.yaml back byte for
byte; a stage's config error (exit 2) is not retried, any other failure is; the workspace lock
refuses a second run; DVC's git hints stay out of the logs; the served deployment runs one flow
run at a time."""
import copy
import os
import subprocess

import pytest
import yaml

from tests.helpers import MICRO_PARAMS, ROOT, env_for_subprocess, write_params

STUB = """stages:
  ok:
    cmd: python -c "open('ok.txt', 'w').write('ok')"
    outs: [ok.txt]
  boom:
    cmd: python -c "import sys; open('boom.log', 'a').write('x'); sys.exit({code})"
    deps: [ok.txt]
"""


def stub_project(path, code: int):
    path.mkdir()
    env = env_for_subprocess()
    subprocess.run(["git", "init", "-q"], cwd=path, env=env, check=True)   # under git, DVC prints its git hints
    # (writing dvc.lock: "To track the changes with git, run: git add dvc.lock", "Use `dvc push` …")
    subprocess.run(["dvc", "init", "-q"], cwd=path, env=env, check=True)
    (path / "dvc.yaml").write_text(STUB.format(code=code))
    params = copy.deepcopy(MICRO_PARAMS)
    params["tracking"] = {"uri": f"sqlite:///{path}/mlflow.db", "experiment": "winnow-flow-seams"}
    write_params(path, params)
    return path


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    """One temporary Prefect server (and database) for this module's flow runs."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def in_project(tmp_path, monkeypatch):
    def make(code: int):
        proj = stub_project(tmp_path / f"proj{code}", code)
        monkeypatch.chdir(proj)
        monkeypatch.setenv("PATH", env_for_subprocess()["PATH"])
        return proj
    return make


def _exception(state):
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, BaseException), exc
    return exc


class _Log:
    """Stands in for the run logger: what run_stage sends to the Prefect log, whatever the level."""

    def __init__(self):
        self.lines = []

    def info(self, msg, *args, **kwargs):
        self.lines.append(str(msg))

    debug = warning = error = info


def test_a_bad_recipe_fails_before_params_yaml_is_written(in_project):
    from flows.pipeline import pipeline
    from winnow.config import ParamsError

    proj = in_project(2)
    before = (proj / "params.yaml").read_bytes()
    state = pipeline(recipe="basik", return_state=True)
    assert state.is_failed()
    exc = _exception(state)
    assert isinstance(exc, ParamsError) and "filter.recipe 'basik'" in str(exc)
    assert (proj / "params.yaml").read_bytes() == before
    assert not (proj / "ok.txt").exists() and not (proj / "boom.log").exists()   # no stage ran


def test_a_config_error_is_not_retried_and_params_yaml_is_put_back(in_project, monkeypatch):
    from flows.pipeline import StageFailed, pipeline

    proj = in_project(2)
    log = _Log()
    monkeypatch.setattr("flows.pipeline.get_run_logger", lambda: log)
    before = (proj / "params.yaml").read_bytes()
    state = pipeline(recipe="basic", return_state=True)
    assert state.is_failed()
    exc = _exception(state)
    assert isinstance(exc, StageFailed) and (exc.stage, exc.exit_code) == ("boom", 2), exc
    assert (proj / "boom.log").read_text() == "x"              # run once: a retry cannot fix a config error
    assert (proj / "ok.txt").exists()                          # the stage before it ran with the new params
    assert (proj / "params.yaml").read_bytes() == before       # ... and params.yaml is as it was, byte for byte
    assert any("Running stage 'ok'" in m for m in log.lines), log.lines            # DVC's output is logged,
    assert not any("git add" in m or "To track the changes" in m for m in log.lines), log.lines   # its git hints not
    assert not any("dvc push" in m for m in log.lines), log.lines


def test_any_other_stage_failure_is_retried(in_project):
    from flows.pipeline import StageFailed, pipeline

    proj = in_project(3)
    state = pipeline(return_state=True)
    exc = _exception(state)
    assert isinstance(exc, StageFailed) and exc.exit_code == 3
    assert (proj / "boom.log").read_text() == "xx"


def test_a_flow_run_leaves_its_store_out_of_the_environment(in_project, monkeypatch):
    """The flow runs in a long-lived process (a served deployment, a test session): the next run's
    stages, in another project, must not inherit this one's MLflow store (MLflow exports it)."""
    from flows.pipeline import pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    in_project(3)
    pipeline(return_state=True)
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_the_workspace_lock_refuses_a_second_run(in_project):
    from flows.pipeline import pipeline
    from winnow.workspace import WorkspaceBusy, workspace_lock

    proj = in_project(2)
    before = (proj / "params.yaml").read_bytes()
    with workspace_lock():          # another run holds this workspace
        state = pipeline(recipe="basic", return_state=True)
    assert isinstance(_exception(state), WorkspaceBusy)
    assert (proj / "params.yaml").read_bytes() == before and not (proj / "ok.txt").exists()
    with workspace_lock():          # released by the failed run too
        pass


def test_stage_exit_code_is_the_stages_not_dvcs():
    from winnow.dvcfile import stage_exit_code

    lines = ["winnow check: FAILED — ParamsError",
             "ERROR: failed to reproduce 'check': failed to run: python -m stages.check, exited with 2"]
    assert stage_exit_code(lines, 255) == 2
    assert stage_exit_code(["ERROR: unexpected error"], 255) == 255


def test_serve_runs_one_flow_run_at_a_time(monkeypatch):
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    from flows import serve

    seen = {}
    monkeypatch.setattr(serve.pipeline, "serve", lambda **kw: seen.update(kw), raising=False)
    serve.main(["--name", "t", "--cron", "0 3 * * *"])
    assert seen["limit"] == 1
    assert seen["global_limit"].limit == 1
    assert seen["global_limit"].collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    deployment = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"][0]
    assert deployment["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}


def test_prefect_yaml_concurrency_is_valid_for_prefect():
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    deployment = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"][0]
    assert ConcurrencyLimitConfig(**deployment["concurrency_limit"]).limit == 1


def test_a_stage_dvc_restores_from_its_run_cache_reports_cached(tmp_path):
    """The flow's result for each stage says what DVC did: ran it, skipped it (inputs unchanged), or
    restored its outputs from the run-cache without running it."""
    import logging

    from flows.pipeline import _follow

    project = stub_project(tmp_path / "p", 0)
    (project / "in.txt").write_text("in")       # DVC keeps no run-cache entry for a stage without deps
    (project / "dvc.yaml").write_text("stages:\n  ok:\n    cmd: python -c \"open('ok.txt', 'w').write('ok')\"\n"
                                      "    deps: [in.txt]\n    outs: [ok.txt]\n")

    def repro() -> str:
        proc = subprocess.Popen(["dvc", "repro", "--single-item", "ok"], cwd=project, env=env_for_subprocess(),
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
        return _follow("ok", proc, logging.getLogger("test"))

    assert repro() == "ran"
    assert repro() == "skipped"
    (project / "ok.txt").unlink()
    (project / "dvc.lock").unlink()        # no lock: DVC looks the stage up in its run-cache
    assert repro() == "cached"
    assert (project / "ok.txt").read_text() == "ok"
