"""Recipes x seeds at equal samples seen, as DVC experiments, and the table that says whether
filtering pays (``python -m winnow sweep``).

Each (recipe, seed) is one ``dvc exp run -n <recipe>-<scale>-s<seed>`` (DVC re-runs only filter
onward; pool, tasks, scorer and embed come from the cache), its own MLflow parent run, so the runs
are also in ``winnow compare``. Each result is kept in
``reports/compare/demo/<recipe>-<scale>-s<seed>.json`` with its ``point_key`` (what the result
depends on: the recipe as params.yaml would run it, the files it reads, the scale preset, the
locked world), so an interrupted sweep resumes with the runs it lacks and an edited recipe, override,
word list, preset or a new pool re-runs its points.
``reports/compare/demo.md`` gives, per recipe, the mean, standard deviation and range over seeds of
the average and of each group, and whether the recipe beats ``no_filter`` by more than the seed
spread (its worst seed above no_filter's best).
Every point is preflighted (winnow.preflight) before any runs, so a misspelt recipe fails the
sweep at once instead of after hours of other points. At the end, or on any failure, params.yaml
and dvc.lock are put back (atomically) and the workspace outputs checked out again. The sweep holds
the workspace lock (``.winnow/flow.lock``) that a Prefect flow run takes too.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from winnow.io import atomic_file, read_json, write_json

RESULTS = Path("reports/compare/demo")
TABLE = Path("reports/compare/demo.md")


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def recipe_name(recipe: str | dict) -> str:
    """A recipe's name: a named recipe's, or an inline one's ``name`` (winnow.ablation's variants)."""
    return recipe if isinstance(recipe, str) else str(recipe["name"])


def world(lock: str = "dvc.lock", params: str = "params.yaml") -> dict:
    """What every point of a sweep is measured on: the pool and tasks ``dvc.lock`` records and the
    scorer's params. Not the scorer's or the embeddings' outputs: the plan skips the scorer and the
    flipped images for recipes that need neither, so those outputs follow the recipe that ran last."""
    from winnow.config import load_yaml

    stages = (load_yaml(lock) or {}).get("stages", {}) if Path(lock).exists() else {}
    w = {st: [o.get("md5") for o in stages.get(st, {}).get("outs", [])[:1]] for st in ("pool", "tasks")}
    w["scorer"] = (load_yaml(params) if Path(params).exists() else {}).get("scorer")
    return w


def point_key(recipe: str | dict, scale: str, world_: dict | None = None, params: str = "params.yaml") -> str:
    """What a point's result depends on besides its seed: the recipe's steps (not its name or
    prose) with params.yaml's overrides and targets, the bytes of every file its steps and targets
    read, the scale preset's contents, the rest of the ``filter``, ``train`` and ``eval`` sections,
    and the ``world``. A saved point is reused only under the same key, so editing a recipe, an
    override, a word list or a preset, regenerating the pool or retraining the scorer differently
    re-runs it instead of reusing a number measured on something else."""
    from winnow.config import load_scale, load_yaml
    from winnow.filters.engine import load_recipe, raw_recipe
    from winnow.jobs import content_identity, digest

    raw = raw_recipe(recipe)[0]
    p = load_yaml(params) if Path(params).exists() else {}
    f = {k: v for k, v in (p.get("filter") or {}).items() if k != "recipe"}   # the sweep sets the recipe
    built = load_recipe(recipe, f.get("overrides"), f.get("targets"))
    files = built.input_files()
    return digest({"steps": raw.get("steps"), "bounds": raw.get("bounds"), "filter": f, "scale": scale,
                   "preset": load_scale(scale), "files": {x: content_identity(x) for x in files},
                   "train": {k: v for k, v in (p.get("train") or {}).items() if k not in ("seed", "scale")},
                   "eval": p.get("eval"), "world": world() if world_ is None else world_}, 16)


def result_path(results: Path, recipe: str | dict, seed: int, scale: str) -> Path:
    """Where a point's result is kept: one file per recipe, scale and seed."""
    return results / f"{point_name(recipe, seed, scale)}.json"


def point_name(recipe: str | dict, seed: int, scale: str) -> str:
    """A point's DVC experiment name (and its MLflow parent's): the scale is in it, so points of
    two scales never replace each other."""
    return f"{recipe_name(recipe)}-{scale}-s{seed}"


def saved_rows(recipes: list[str], scale: str, results: Path = RESULTS) -> list[dict]:
    """The saved results of ``recipes`` at ``scale``, in recipe order (``--table-only``)."""
    rows = [read_json(p) for p in sorted(results.glob("*.json"))]
    return [r for name in recipes for r in sorted(rows, key=lambda r: r["seed"])
            if r["recipe"] == name and r.get("scale") == scale]


def run_one(recipe: str | dict, seed: int, scale: str) -> dict:
    """One DVC experiment (its own MLflow parent run, named after it: winnow.track); returns what
    the table needs. ``recipe``: a name, or an inline recipe (written into params.yaml, which DVC
    tracks)."""
    from winnow.config import set_params

    set_params("params.yaml", {"filter.recipe": recipe, "train.seed": seed, "train.scale": scale})
    name = point_name(recipe, seed, scale)
    recipe = recipe_name(recipe)
    # an experiment of the same name from an earlier sweep is replaced (`exp run --force` would also
    # force every stage to re-run, which is not what a sweep wants)
    subprocess.run(["dvc", "exp", "remove", name], env=_env(), capture_output=True)
    proc = subprocess.run(["dvc", "exp", "run", "-n", name], env=_env())
    if proc.returncode != 0:
        raise RuntimeError(f"dvc exp run for {name} failed (exit {proc.returncode})")
    summary, funnel = read_json("reports/eval/summary.json"), read_json("reports/filter/funnel.json")
    return {"recipe": recipe, "seed": seed, "scale": scale, "average": summary["average"],
            "groups": summary["groups"], "missing": summary["missing"],
            "samples_seen": summary["model"]["samples_seen"], "subset_size": funnel["subset_size"],
            "kept_unique": funnel["kept_unique"]}


def points(recipes: list[str | dict], seeds: list[int], scale: str) -> list[dict]:
    """The params each (recipe, seed) sets, as run_one sets them."""
    return [{"filter.recipe": r, "train.seed": s, "train.scale": scale} for r in recipes for s in seeds]


def preflight_all(recipes: list[str | dict], seeds: list[int], scale: str, path: str = "params.yaml") -> None:
    """Every point checked before any runs; one ParamsError naming each point that cannot."""
    from winnow import preflight
    from winnow.config import ParamsError

    bad, seen = [], set()
    for updates in points(recipes, seeds, scale):
        key = (recipe_name(updates["filter.recipe"]), updates["train.scale"])   # the seed changes no check's verdict
        if key in seen:
            continue
        seen.add(key)
        try:
            preflight.run(path, updates)
        except ParamsError as exc:
            lines = [line.strip() for line in str(exc).splitlines()[1:]]
            bad.append(f"recipe {key[0]}, scale {scale}:" + "".join(f"\n    {x}" for x in lines))
    if bad:
        raise ParamsError("sweep: nothing run, these points cannot run:\n  " + "\n  ".join(bad))


def _put_back(saved: dict[str, bytes]) -> None:
    for p, b in saved.items():
        if not Path(p).exists() or Path(p).read_bytes() != b:
            with atomic_file(p) as tmp:
                Path(tmp).write_bytes(b)


def sweep(recipes: list[str | dict], seeds: list[int], scale: str, results: Path = RESULTS) -> list[dict]:
    from winnow.workspace import workspace_lock

    with workspace_lock():
        preflight_all(recipes, seeds, scale)
        return _sweep(recipes, seeds, scale, results)


def _sweep(recipes: list[str | dict], seeds: list[int], scale: str, results: Path) -> list[dict]:
    saved = {p: Path(p).read_bytes() for p in ("params.yaml", "dvc.lock") if Path(p).exists()}
    rows, measured_on = [], world()       # the same for every point: read once
    try:
        for recipe in recipes:
            key = point_key(recipe, scale, measured_on)     # the seed is not in the key
            for seed in seeds:
                path = result_path(results, recipe, seed, scale)
                kept = read_json(path) if path.exists() else {}
                if kept.get("key") == key:
                    rows.append(kept)
                    continue
                print(f"\n=== sweep: {recipe_name(recipe)}, seed {seed} ({len(rows) + 1}/{len(recipes) * len(seeds)}) ===", flush=True)
                row = run_one(recipe, seed, scale) | {"key": key} | ({"inline": recipe} if isinstance(recipe, dict) else {})
                write_json(path, row)
                rows.append(row)
    finally:
        _put_back(saved)
        subprocess.run(["dvc", "checkout", "--force", "--quiet"], env=_env())
    return rows


def _stats(xs: list[float]) -> dict:
    a = np.array(xs, float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "n": len(a)}


def table(rows: list[dict], baseline: str = "no_filter") -> tuple[str, dict]:
    """The markdown table and the per-recipe statistics."""
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    recipes.sort(key=lambda r: r != baseline)      # the baseline first, the rest in sweep order
    groups = sorted({g for r in rows for g in r["groups"]})
    stats = {}
    for rec in recipes:
        mine = [r for r in rows if r["recipe"] == rec]
        stats[rec] = {"average": _stats([r["average"] for r in mine]),
                      "groups": {g: _stats([r["groups"][g] for r in mine if g in r["groups"]]) for g in groups},
                      "subset_size": sorted({r["subset_size"] for r in mine}),
                      "samples_seen": sorted({r["samples_seen"] for r in mine}),
                      "seeds": sorted(r["seed"] for r in mine)}
    base = stats.get(baseline)
    for rec, s in stats.items():
        if base and rec != baseline:
            s["delta_vs_baseline"] = s["average"]["mean"] - base["average"]["mean"]
            # two readings of "more than the seed spread": the difference of means exceeds the larger
            # seed standard deviation; and the stricter one, every seed above every baseline seed
            s["beats_baseline_beyond_std"] = s["delta_vs_baseline"] > max(s["average"]["std"], base["average"]["std"])
            s["beats_baseline_beyond_spread"] = s["average"]["min"] > base["average"]["max"]

    def cell(st):
        return f"{st['mean']:.3f} ± {st['std']:.3f} ({st['min']:.3f}–{st['max']:.3f})"

    lines = ["# Filtering on the demo: recipes x seeds at equal samples seen", "",
             "Mean ± sample std over seeds (min–max in brackets). `Δ > std`: the difference of mean averages "
             f"exceeds the larger seed std of the two; `worst > best`: every seed of the recipe is above every "
             f"seed of `{baseline}`.", "",
             "| recipe | subset size | samples seen | seeds | average | " + " | ".join(groups)
             + f" | Δ vs {baseline} | Δ > std | worst > best |",
             "|---|---|---|---|---|" + "---|" * len(groups) + "---|---|---|"]
    for rec in recipes:
        s = stats[rec]
        delta = f"{s['delta_vs_baseline']:+.3f}" if "delta_vs_baseline" in s else "—"
        yes = {True: "yes", False: "no"}
        beats = " | ".join(yes[s[k]] if k in s else "—" for k in ("beats_baseline_beyond_std", "beats_baseline_beyond_spread"))
        lines.append(f"| {rec} | {'/'.join(map(str, s['subset_size']))} | {'/'.join(map(str, s['samples_seen']))} | "
                     f"{len(s['seeds'])} | {cell(s['average'])} | "
                     + " | ".join(cell(s["groups"][g]) if s["groups"][g]["n"] else "—" for g in groups)
                     + f" | {delta} | {beats} |")
    return "\n".join(lines) + "\n", stats


def write_table(rows: list[dict]) -> str:
    text, stats = table(rows)
    with atomic_file(TABLE) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    write_json(TABLE.with_suffix(".json"), {"runs": rows, "stats": stats})
    return text


def main(recipes: list[str], seeds: list[int], scale: str) -> int:
    from winnow.errors import WinnowError

    try:
        rows = sweep(recipes, seeds, scale)
    except WinnowError as exc:
        print(str(exc), file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    print(write_table(rows))
    print(f"wrote {TABLE.resolve()}")
    return 0

