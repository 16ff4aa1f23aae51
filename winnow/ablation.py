"""The seed paper's "slice and dice" on the demo (``python -m winnow ablation``): variants of a base
recipe with its components taken away, cumulative (each adds the next component to the ones
before) and leave-one-out (the full recipe less one), beside baselines, each at equal samples seen
over several seeds, as sweep points (winnow.sweep: DVC experiments, MLflow runs, resumable; the
results are kept beside the demo sweep's, reports/compare/demo/, so a point both run runs once).

The spec is ``configs/ablation/<base>.yaml``: the base recipe, its components in the paper's order,
each a list of paths into the recipe (a step label; ``any_of/branch`` for a branch of an
``any_of``; ``any_of/branch/step`` for a step in one), and the baseline recipes. A variant is the
base recipe written inline with the other components' paths removed; an ``any_of`` left with one
branch becomes that branch's steps. The table goes to ``reports/compare/ablation.md`` (and
``.json``, which the HTML report charts).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from winnow.config import CONFIGS, ParamsError, load_yaml, validate_model
from winnow.io import atomic_file, write_json

TABLE = Path("reports/compare/ablation.md")


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: str
    components: dict[str, list[str]] = Field(min_length=2)
    baselines: list[str] = []


def load_spec(name: str) -> Spec:
    path = CONFIGS / "ablation" / f"{name}.yaml"
    if not path.exists():
        have = ", ".join(sorted(p.stem for p in (CONFIGS / "ablation").glob("*.yaml")))
        raise ParamsError(f"no ablation spec '{name}' (available: {have})")
    return validate_model(Spec, load_yaml(path), path.name)


def _label(spec: dict) -> str:
    return spec.get("name") or spec.get("step")


def _remove(steps: list[dict], path: list[str], where: str) -> list[dict]:
    """``steps`` without the step, branch or branch step at ``path``."""
    labels = [_label(s) for s in steps]
    if path[0] not in labels:
        raise ParamsError(f"ablation: {where} names no step '{path[0]}' (steps: {', '.join(labels)})")
    k = labels.index(path[0])
    if len(path) == 1:
        return steps[:k] + steps[k + 1:]
    group = copy.deepcopy(steps[k])
    branches = group.get("branches") or []
    names = [b.get("name") for b in branches]
    if path[1] not in names:
        raise ParamsError(f"ablation: {where}: '{path[0]}' has no branch '{path[1]}' (branches: {', '.join(map(str, names))})")
    b = names.index(path[1])
    if len(path) == 2:
        branches[b]["steps"] = []
    else:
        branches[b]["steps"] = _remove(branches[b]["steps"], path[2:], where)
    return steps[:k] + [group] + steps[k + 1:]


def _dissolve(steps: list[dict]) -> list[dict]:
    """Empty branches gone; an ``any_of`` left with one branch becomes its steps (no union left)."""
    out = []
    for s in steps:
        if "branches" not in s:
            out.append(s)
            continue
        branches = [b for b in s["branches"] if b["steps"]]
        out += [s | {"branches": branches}] if len(branches) > 1 else (branches[0]["steps"] if branches else [])
    return out


def variant(base: dict, spec: Spec, keep: list[str], name: str) -> dict:
    """The base recipe (raw) with every component not in ``keep`` removed, as an inline recipe."""
    steps = copy.deepcopy(base["steps"])
    for comp, paths in spec.components.items():
        if comp not in keep:
            for p in paths:
                steps = _remove(steps, p.split("/"), f"component '{comp}' path '{p}'")
    steps = _dissolve(steps)
    return {"name": name, "description": f"{spec.base} with only: {', '.join(keep)}",
            "bounds": {"min_fraction": 0.0, "max_fraction": 1.0}, "steps": steps}


def variants(spec: Spec) -> list[dict]:
    """[{kind: cumulative | leave_one_out, component, recipe}], the full recipe once (cumulative's
    last), every variant validated as a recipe before anything runs."""
    from winnow.filters.engine import load_recipe, raw_recipe

    base = raw_recipe(spec.base)[0]
    comps = list(spec.components)
    out, seen = [], set()
    for i, comp in enumerate(comps):
        keep = comps[: i + 1]
        name = spec.base if i == len(comps) - 1 else f"abl-{i + 1}-{comp}"
        out.append({"kind": "cumulative", "component": comp, "recipe": variant(base, spec, keep, name)})
        seen.add(tuple(keep))
    for comp in comps:
        keep = [c for c in comps if c != comp]
        if tuple(keep) not in seen:
            out.append({"kind": "leave_one_out", "component": comp,
                        "recipe": variant(base, spec, keep, f"abl-no-{comp}")})
    for v in out:
        load_recipe(v["recipe"])
    if left := variant(base, spec, [], "none")["steps"]:
        raise ParamsError(f"ablation: steps {[_label(s) for s in left]} of {spec.base} are in no component")
    out[len(comps) - 1]["recipe"] = spec.base     # the full recipe runs by its name, as shipped
    return out


def table(rows: list[dict], spec: Spec, plan: list[dict]) -> tuple[str, dict]:
    from winnow.sweep import _stats, recipe_name

    by = {}
    for r in rows:
        by.setdefault(r["recipe"], []).append(r)
    groups = sorted({g for r in rows for g in r["groups"]})
    imagenet = "ImageNet" if "ImageNet" in groups else (groups[0] if groups else None)

    def stats(name):
        mine = by.get(name, [])
        return {"average": _stats([r["average"] for r in mine]) if mine else None,
                "imagenet": _stats([r["groups"][imagenet] for r in mine if imagenet in r["groups"]]) if mine else None,
                "subset_size": sorted({r["subset_size"] for r in mine}),
                "samples_seen": sorted({r["samples_seen"] for r in mine}), "seeds": sorted(r["seed"] for r in mine)}

    full = stats(spec.base)
    lines, out = [f"# Ablation of `{spec.base}` on the demo: components added and left out, at equal samples seen", "",
                  "Mean ± sample std over seeds (min–max). Cumulative rows add one component to the row above "
                  "(Δ: against that row); leave-one-out rows drop one component from the full recipe (Δ: against "
                  "the full recipe); baselines are compared with the full recipe (Δ: full − baseline). "
                  "`beyond spread`: every seed of the better of the two above every seed of the other.", ""], []
    head = f"| part | variant | subset size | samples seen | seeds | average | {imagenet} | Δ average | Δ {imagenet} | beyond spread |"
    lines += [head, "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(st):
        return f"{st['mean']:.3f} ± {st['std']:.3f} ({st['min']:.3f}–{st['max']:.3f})" if st else "—"

    def beyond(a, b):     # every seed of the better above every seed of the worse
        if not a or not b:
            return None
        return a["min"] > b["max"] or b["min"] > a["max"]

    def line(part, name, st, ref, sign=1):
        d = dn = None
        if ref and st["average"] and ref["average"]:
            d = sign * (st["average"]["mean"] - ref["average"]["mean"])
            dn = sign * (st["imagenet"]["mean"] - ref["imagenet"]["mean"]) if st["imagenet"] and ref["imagenet"] else None
        spread = beyond(st["average"], ref["average"]) if ref else None
        out.append({"part": part, "variant": name, **st, "delta": d, "delta_imagenet": dn, "beyond_spread": spread})
        fmt = (lambda x: f"{x:+.3f}" if x is not None else "—")
        lines.append(f"| {part} | {name} | {'/'.join(map(str, st['subset_size'])) or '—'} | "
                     f"{'/'.join(map(str, st['samples_seen'])) or '—'} | {len(st['seeds'])} | {cell(st['average'])} | "
                     f"{cell(st['imagenet'])} | {fmt(d)} | {fmt(dn)} | "
                     f"{ {True: 'yes', False: 'no', None: '—'}[spread] } |")

    prev = None
    for v in plan:
        if v["kind"] == "cumulative":
            name = recipe_name(v["recipe"])
            line(f"+ {v['component']}" if prev else v["component"], name, stats(name), prev)
            prev = stats(name)
    for v in plan:
        if v["kind"] == "leave_one_out":
            name = recipe_name(v["recipe"])
            line(f"− {v['component']}", name, stats(name), full)
    for b in spec.baselines:
        line("baseline", b, stats(b), full, sign=-1)
    return "\n".join(lines) + "\n", {"base": spec.base, "groups": groups, "imagenet_group": imagenet, "rows": out}


def write_table(rows: list[dict], spec: Spec, plan: list[dict]) -> str:
    text, stats = table(rows, spec, plan)
    with atomic_file(TABLE) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    write_json(TABLE.with_suffix(".json"), {"runs": rows, **stats})
    return text


def main(name: str, seeds: list[int], scale: str, table_only: bool = False) -> int:
    from winnow import sweep
    from winnow.errors import WinnowError

    try:
        spec = load_spec(name)
        plan = variants(spec)
        if table_only:
            rows = sweep.saved_rows(list(spec.baselines) + [sweep.recipe_name(v["recipe"]) for v in plan], scale)
        else:   # the demo sweep's results: a point both run (no_filter, the full recipe) runs once
            rows = sweep.sweep(list(spec.baselines) + [v["recipe"] for v in plan], seeds, scale)
    except WinnowError as exc:
        print(str(exc), file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    print(write_table(rows, spec, plan))
    print(f"wrote {TABLE.resolve()}")
    return 0
