"""The stage DAG as dvc.yaml declares it: a stage depends on every stage that outputs one of its deps."""
from __future__ import annotations

from pathlib import Path

import yaml

from winnow.publish import declared_outputs


def _under(dep: str, out: str) -> bool:
    return dep == out or dep.startswith(out.rstrip("/") + "/") or out.startswith(dep.rstrip("/") + "/")


def load_dag(path: str | Path = "dvc.yaml") -> dict[str, list[str]]:
    """``{stage: [upstream stages]}`` in dvc.yaml order."""
    stages = yaml.safe_load(Path(path).read_text(encoding="utf-8"))["stages"]
    outs = {name: declared_outputs(spec) for name, spec in stages.items()}
    dag = {}
    for name, spec in stages.items():
        deps = spec.get("deps", []) or []
        dag[name] = [up for up in stages if up != name and any(_under(d, o) for d in deps for o in outs[up])]
    return dag


def topological(dag: dict[str, list[str]]) -> list[str]:
    order, done = [], set()

    def visit(n, stack=()):
        if n in done:
            return
        if n in stack:
            raise ValueError(f"dvc.yaml has a cycle through {n}")
        for up in dag[n]:
            visit(up, stack + (n,))
        done.add(n)
        order.append(n)

    for n in dag:
        visit(n)
    return order
