"""The dvc.yaml DAG as a Prefect flow: one task per stage (``dvc repro --single-item <stage>``), so
caching and locking stay DVC's while Prefect adds retries, logs, artifacts and scheduling.

    python -m flows.pipeline            # a temporary local Prefect server is started if none is set

A run holds the workspace (``.winnow/flow.lock``: a second run on the same workspace fails at once),
preflights its ``recipe``/``scale`` parameters (winnow.preflight) before writing them to
params.yaml, and puts params.yaml back byte for byte if anything fails after that, so a bad
parameter never leaves a params.yaml every later scheduled run would fail on. A failed stage is a
``StageFailed`` with the stage's own exit code; a config error (exit 2) is not retried.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from winnow.dvcfile import dag as load_dag
from winnow.dvcfile import stage_exit_code
from winnow.dvcfile import order as topological
from winnow.track import scrub


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


_BAR = re.compile(r"^(?P<desc>.*?):\s+(?P<pct>\d+)%\|")


CONFIG_EXIT = 2   # winnow.config.ParamsError.exit_code: a config error, which no retry fixes
# DVC's hints after every stage it runs (`git add dvc.lock` …): noise in a flow's log
_HINTS = ("To track the changes with git", "git add ", "To enable auto staging", "dvc config core.autostage",
          "Use `dvc push` to send your updates")


class StageFailed(RuntimeError):
    """A stage failed under DVC; ``exit_code`` is the stage's own (DVC itself exits 255 on any
    failure and prints "... exited with N")."""

    def __init__(self, stage: str, exit_code: int, tail: list[str] | tuple = ()):
        self.stage, self.exit_code, self.tail = stage, exit_code, list(tail)
        kind = " (a config error: not retried)" if exit_code == CONFIG_EXIT else ""
        super().__init__(f"stage {stage} failed (exit {exit_code}){kind}:\n" + "\n".join(self.tail))

    def __reduce__(self):   # Prefect pickles a failed task's exception
        return type(self), (self.stage, self.exit_code, self.tail)


def _retry_unless_config_error(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry a failed stage unless it failed on its config (exit 2)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:   # the result cannot be read back: judge by the state's message
        exc = None
    if isinstance(exc, BaseException):
        return not (isinstance(exc, StageFailed) and exc.exit_code == CONFIG_EXIT)
    return f"(exit {CONFIG_EXIT})" not in (state.message or "")


@task(retries=1, retry_delay_seconds=2, task_run_name="{stage}", retry_condition_fn=_retry_unless_config_error)
def run_stage(stage: str) -> str:
    """Run one stage through DVC, streaming its output to the Prefect log: progress bars every
    quarter, training lines at each epoch's end. Returns ``ran``, ``skipped`` (DVC found its inputs
    unchanged) or ``cached`` (DVC restored its outputs from its cache without running it)."""
    log = get_run_logger()
    proc = subprocess.Popen(["dvc", "repro", "--single-item", stage], env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
    try:   # a flow killed mid-stage takes its dvc with it (else it outlives the lock and params.yaml's restore)
        return _follow(stage, proc, log)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait()


def _follow(stage: str, proc: subprocess.Popen, log) -> str:
    shown: dict[str, int] = {}
    tail: list[str] = []
    skipped = cached = False
    for line in proc.stdout:   # text mode turns tqdm's carriage returns into line ends
        line = scrub(line.rstrip())   # Prefect stores these lines: never a credential in them
        if not line:
            continue
        if line.lstrip().startswith(_HINTS):
            continue
        tail = (tail + [line])[-40:]
        skipped |= "didn't change, skipping" in line
        cached |= "is cached - skipping run" in line    # DVC restored the outputs from its run-cache
        bar = _BAR.match(line)
        if bar:
            pct, desc = int(bar["pct"]), bar["desc"]
            if pct - shown.get(desc, -100) >= 25 or (pct == 100 and shown.get(desc) != 100):
                shown[desc] = pct
                log.info(line)
        elif "Train Epoch" not in line or "(100%)" in line:
            log.info(line)
    if proc.wait() != 0:
        raise StageFailed(stage, stage_exit_code(tail, proc.returncode), tail)
    return "skipped" if skipped else "cached" if cached else "ran"


def _publish_artifacts() -> None:
    funnel = Path("reports/filter/funnel.json")
    if funnel.exists():
        f = json.loads(funnel.read_text())
        rows = [{"step": "pool", "kept": f["pool_size"], "dropped": 0}]
        rows += [{"step": s["step"], "kept": s["kept_after"], "dropped": s["dropped_here"]} for s in f["steps"]]
        create_table_artifact(key="funnel", table=rows, description=f"recipe {f['recipe']}")
    summary = Path("reports/eval/summary.json")
    if summary.exists():
        s = json.loads(summary.read_text())
        md = ["| task | main metric |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in s["tasks"].items()]
        md += [f"| group: {g} | {v:.3f} |" for g, v in s["groups"].items()]
        md.append(f"| **average** | {s['average']:.3f} |" if s["average"] is not None else "| average | n/a |")
        create_markdown_artifact(key="eval-summary", markdown="\n".join(md), description="evaluation summary")
    runs = Path("reports/compare/runs.md")
    if runs.exists():
        create_markdown_artifact(key="runs", markdown=runs.read_text(), description="runs compared (MLflow)")


def _run_stages(params, dvc_yaml: str) -> dict:
    """Every stage in dependency order under one MLflow parent run, then the artifacts."""
    from winnow import track

    order = topological(load_dag(dvc_yaml))
    results = {}
    with track.pipeline_run(params, name="prefect-pipeline"):
        for stage in order:
            results[stage] = run_stage(stage)
    _publish_artifacts()
    return results


@flow(name="winnow-pipeline", log_prints=True)
def pipeline(recipe: str | None = None, scale: str | None = None, dvc_yaml: str = "dvc.yaml") -> dict:
    """Run every stage of dvc.yaml in dependency order under one MLflow parent run.

    ``recipe`` / ``scale`` set ``filter.recipe`` / ``train.scale`` in params.yaml first (as
    ``dvc exp run -S`` does), so DVC re-runs exactly what they affect: checked first (nothing is
    written when they cannot run), and params.yaml is put back if the run then fails."""
    from winnow import preflight
    from winnow.config import set_params
    from winnow.workspace import workspace_lock

    updates = {k: v for k, v in {"filter.recipe": recipe, "train.scale": scale}.items() if v}
    with workspace_lock(), preflight.restore_on_failure("params.yaml"):
        params = preflight.run("params.yaml", updates)   # a bad value fails here, before params.yaml is written
        if updates:
            set_params("params.yaml", updates)
        results = _run_stages(params, dvc_yaml)
    print(f"report: {Path('reports/index.html').resolve()}")
    return results


if __name__ == "__main__":
    print(pipeline())
