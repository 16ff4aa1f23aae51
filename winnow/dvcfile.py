"""The one reader of dvc.yaml: stages, their params keys, deps, declared outputs, and the DAG order.

dvc.yaml is the single declaration of each stage; stage.main, publish, the Prefect flow and
``winnow publish`` all read it through here.
"""
from __future__ import annotations

import re
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

from winnow.errors import WinnowError


class DvcYamlError(WinnowError, ValueError):
    """dvc.yaml is missing a stage or its DAG has a cycle."""


def stages(dvc_yaml: str | Path = "dvc.yaml") -> dict[str, dict]:
    """``{name: spec}`` in dvc.yaml order."""
    from winnow.config import safe_load

    return safe_load(Path(dvc_yaml).read_text(encoding="utf-8"), dvc_yaml)["stages"]


def stage(name: str, dvc_yaml: str | Path = "dvc.yaml") -> dict:
    try:
        return stages(dvc_yaml)[name]
    except KeyError:
        raise DvcYamlError(f"{dvc_yaml} has no stage {name!r}") from None


def params_keys(name: str, dvc_yaml: str | Path = "dvc.yaml") -> list[str]:
    """The stage's ``params:`` list as dotted keys (``eval`` or ``pool.shard_size``)."""
    keys = []
    for p in stage(name, dvc_yaml).get("params", []) or []:
        if isinstance(p, dict):   # DVC's ``{other.yaml: [keys]}`` form: winnow reads params.yaml only, keep the keys;
            for file, ks in p.items():   # ``{params.yaml: null}``: the whole file, i.e. all its sections
                keys.extend(ks if ks is not None else list(_sections(Path(dvc_yaml).parent / file)))
        else:
            keys.append(p)
    return keys


def _sections(path: Path) -> list[str]:
    from winnow.config import load_yaml   # a YAML error: one line with its line and column (exit 2)

    return list(load_yaml(path) or {})


def deps(name: str, dvc_yaml: str | Path = "dvc.yaml") -> list[str]:
    return list(stage(name, dvc_yaml).get("deps", []) or [])


def declared_outputs(spec: dict) -> list[str]:
    """The paths a stage spec declares as outs, metrics and plots, their options (persist, x/y) stripped."""
    paths = []
    for kind in ("outs", "metrics", "plots"):
        for o in spec.get(kind, []) or []:
            paths.append(next(iter(o)) if isinstance(o, dict) else o)
    return paths


def outputs(name: str, dvc_yaml: str | Path = "dvc.yaml") -> list[str]:
    return declared_outputs(stage(name, dvc_yaml))


def documents(name: str, dvc_yaml: str | Path = "dvc.yaml") -> list[str]:
    """Files a stage writes on every run that are not DVC outputs (``meta: {documents: [...]}``,
    which DVC ignores): the report's pages, dated, so never cached."""
    return list((stage(name, dvc_yaml).get("meta") or {}).get("documents", []) or [])


def _under(dep: str, out: str) -> bool:
    # a dep inside an out (data/plan/needs.json in data/plan) or an out inside a dep directory
    return dep == out or dep.startswith(out.rstrip("/") + "/") or out.startswith(dep.rstrip("/") + "/")


def dag(dvc_yaml: str | Path = "dvc.yaml") -> dict[str, list[str]]:
    """``{stage: [upstream stages]}`` in dvc.yaml order: a stage depends on every stage that outputs one of its deps."""
    specs = stages(dvc_yaml)
    outs = {name: declared_outputs(spec) for name, spec in specs.items()}
    return {name: [up for up in specs if up != name
                   and any(_under(d, o) for d in spec.get("deps", []) or [] for o in outs[up])]
            for name, spec in specs.items()}


def order(graph: dict[str, list[str]]) -> list[str]:
    """A topological order of ``graph``; among stages ready together, the graph's (dvc.yaml's) order."""
    ts = TopologicalSorter(graph)
    try:
        ts.prepare()
    except CycleError as exc:
        raise DvcYamlError(f"dvc.yaml has a cycle: {' -> '.join(exc.args[1])}") from None
    rank = {n: i for i, n in enumerate(graph)}
    ready: set[str] = set()
    result = []
    while ts.is_active():
        # one ready stage at a time, the earliest in dvc.yaml, so the order is stable
        ready.update(ts.get_ready())
        n = min(ready, key=rank.__getitem__)
        ready.remove(n)
        result.append(n)
        ts.done(n)
    return result


_EXITED = re.compile(r"exited with (-?\d+)")


def stage_exit_code(lines: list[str], dvc_code: int) -> int:
    """The failed stage's own exit code from DVC's output ("failed to reproduce '<stage>': ...
    exited with N"), else DVC's (which is 255 for any failure)."""
    for line in reversed(lines):
        if m := _EXITED.search(line):
            return int(m.group(1))
    return dvc_code
