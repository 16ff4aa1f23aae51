"""The dvc.yaml DAG as a Prefect flow: one task per stage (``dvc repro --single-item <stage>``), so
caching and locking stay DVC's while Prefect adds retries, logs, artifacts and scheduling.

    python -m flows.pipeline            # a temporary local Prefect server is started if none is set
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.dag import load_dag, topological


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@task(retries=1, retry_delay_seconds=2, task_run_name="{stage}")
def run_stage(stage: str) -> str:
    """Run one stage through DVC (skipped by DVC when its inputs are unchanged)."""
    log = get_run_logger()
    proc = subprocess.run(["dvc", "repro", "--single-item", stage], env=_env(), capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        # per-step training lines stay in open_clip_train's own log; keep each epoch's last one
        noisy = "Train Epoch" in line and "(100%)" not in line
        if line.strip() and "\r" not in line and not noisy:
            log.info(line)
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return "skipped" if "didn't change, skipping" in proc.stdout else "ran"


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


@flow(name="winnow-pipeline", log_prints=True)
def pipeline(dvc_yaml: str = "dvc.yaml") -> dict:
    """Run every stage of dvc.yaml in dependency order under one MLflow parent run."""
    from winnow import track
    from winnow.config import load_params

    params = load_params()   # a params typo fails here, before any stage
    order = topological(load_dag(dvc_yaml))
    results = {}
    with track.pipeline_run(params, name="prefect-pipeline"):
        for stage in order:
            results[stage] = run_stage(stage)
    _publish_artifacts()
    print(f"report: {Path('reports/index.md').resolve()}")
    return results


if __name__ == "__main__":
    print(pipeline())
