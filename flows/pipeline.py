"""The dvc.yaml DAG as a Prefect flow: one task per stage (``dvc repro --single-item <stage>``), so
caching and locking stay DVC's while Prefect adds retries, logs, artifacts and scheduling.

    python -m flows.pipeline            # a temporary local Prefect server is started if none is set
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
from winnow.dvcfile import order as topological


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


_BAR = re.compile(r"^(?P<desc>.*?):\s+(?P<pct>\d+)%\|")


@task(retries=1, retry_delay_seconds=2, task_run_name="{stage}")
def run_stage(stage: str) -> str:
    """Run one stage through DVC (skipped by DVC when its inputs are unchanged), streaming its
    output to the Prefect log: progress bars every quarter, training lines at each epoch's end."""
    log = get_run_logger()
    proc = subprocess.Popen(["dvc", "repro", "--single-item", stage], env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
    shown: dict[str, int] = {}
    tail: list[str] = []
    skipped = False
    for line in proc.stdout:   # text mode turns tqdm's carriage returns into line ends
        line = line.rstrip()
        if not line:
            continue
        tail = (tail + [line])[-40:]
        skipped |= "didn't change, skipping" in line
        bar = _BAR.match(line)
        if bar:
            pct, desc = int(bar["pct"]), bar["desc"]
            if pct - shown.get(desc, -100) >= 25 or (pct == 100 and shown.get(desc) != 100):
                shown[desc] = pct
                log.info(line)
        elif "Train Epoch" not in line or "(100%)" in line:
            log.info(line)
    if proc.wait() != 0:
        raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return "skipped" if skipped else "ran"


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


@flow(name="winnow-pipeline", log_prints=True)
def pipeline(recipe: str | None = None, scale: str | None = None, dvc_yaml: str = "dvc.yaml") -> dict:
    """Run every stage of dvc.yaml in dependency order under one MLflow parent run.

    ``recipe`` / ``scale`` set ``filter.recipe`` / ``train.scale`` in params.yaml first (as
    ``dvc exp run -S`` does), so DVC re-runs exactly what they affect."""
    from winnow import track
    from winnow.config import load_params, set_params
    from winnow.filters.engine import params_recipe

    updates = {k: v for k, v in {"filter.recipe": recipe, "train.scale": scale}.items() if v}
    if updates:
        set_params("params.yaml", updates)
    params = load_params()   # a params typo fails here, before any stage
    params_recipe(params.filter)
    order = topological(load_dag(dvc_yaml))
    results = {}
    with track.pipeline_run(params, name="prefect-pipeline"):
        for stage in order:
            results[stage] = run_stage(stage)
    _publish_artifacts()
    print(f"report: {Path('reports/index.html').resolve()}")
    return results


if __name__ == "__main__":
    print(pipeline())
