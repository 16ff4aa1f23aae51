"""The recipe engine: an ordered list of steps, run shard by shard, with a funnel of what each removed.

Every step decides on every sample of a shard (vectorised), so each step's own effect is known
("standalone"); the funnel attributes a dropped sample to the first step, in recipe order, that
dropped it. Global steps ``fit`` over the whole pool first. Memory is one shard plus global state.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from winnow import io as wio
from winnow.compute import map_shards, release
from winnow.config import CONFIGS, ParamsError, load_yaml, validate_model
from winnow.filters import Step, build_step
from winnow.io import atomic_file, keyed_work_dir, local
from winnow.pool import uids as U
from winnow.pool.shards import ShardError
from winnow.pool.view import Pool


class Bounds(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_fraction: float = Field(0.0, ge=0)
    max_fraction: float = Field(1.0, ge=0)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    name: str
    description: str = ""
    bounds: Bounds = Bounds()
    corrupt_shards: Literal["fail", "quarantine"] = "fail"   # quarantine: skip, count, report
    steps: list[Step] = []

    def labels(self) -> list[str]:
        return _labels([s.label() for s in self.steps])


def _labels(names: list[str]) -> list[str]:
    """Step labels: the name (or kind), with #2, #3 … for repeats."""
    seen: dict[str, int] = {}
    out = []
    for lab in names:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab}#{seen[lab]}")
    return out


def recipe_names() -> list[str]:
    return sorted(p.stem for p in (CONFIGS / "recipes").glob("*.yaml"))


def load_recipe(name: str, overrides: dict | None = None) -> Recipe:
    """A named recipe from configs/recipes, or a path to a recipe YAML, with per-step parameter
    overrides ``{step label: {field: value}}`` (params.yaml ``filter.overrides``); validated before
    any data is read."""
    p = Path(name) if name.endswith((".yaml", ".yml")) else CONFIGS / "recipes" / f"{name}.yaml"
    if not p.exists():
        raise ParamsError(f"unknown filter.recipe '{name}' (valid: {', '.join(recipe_names())})")
    raw = load_yaml(p)
    specs = [dict(s or {}) for s in raw.pop("steps", None) or []]
    labels = _labels([s.get("name") or s.get("step") for s in specs])
    for lab, fields in (overrides or {}).items():
        if lab not in labels:
            raise ParamsError(f"filter.overrides: recipe '{name}' has no step '{lab}' (steps: {', '.join(labels)})")
        if not isinstance(fields, dict):
            raise ParamsError(f"filter.overrides.{lab} must map field names to values")
        specs[labels.index(lab)].update(fields)
    steps = [build_step(s, f"{p.name} steps[{i}] ({labels[i]})") for i, s in enumerate(specs)]
    recipe = validate_model(Recipe, raw | {"steps": []}, str(p))
    recipe.steps = steps
    return recipe


def probe_shards(recipe: Recipe, pool: Pool) -> tuple[Pool, list[dict]]:
    """Read each shard's uids and the embeddings the recipe needs; a shard that cannot be read fails
    the run naming it, or — when the recipe says ``corrupt_shards: quarantine`` — is left out and
    reported with its error."""
    keys = sorted({k for s in recipe.steps for k in s.requires()[1]})
    bad = []
    for shard in pool.shards:
        try:
            b = pool.batch(shard)
            n = len(b.column("uid"))
            for k in (k for k in keys if k in b.embedding_keys()):
                if (rows := b.embedding_rows(k)) != n:
                    raise ShardError(f"shard {shard}: embedding '{k}' has {rows} rows, metadata {n}")
        except (ShardError, KeyError, OSError, ValueError) as exc:
            if recipe.corrupt_shards == "fail":
                raise ShardError(f"{exc} (set `corrupt_shards: quarantine` in the recipe to skip such shards)") from None
            bad.append({"shard": shard, "error": str(exc)})
    names = {b["shard"] for b in bad}
    good = [s for s in pool.shards if s not in names]
    if not good:
        raise ShardError(f"every shard is corrupt: {bad[:3]}")
    return replace(pool, shards=good), bad


def check_requirements(recipe: Recipe, pool: Pool) -> None:
    """Fail before any work if a step needs a column or embedding key the pool does not have."""
    batch = pool.batch(pool.shards[0])
    cols, keys = set(batch.columns()), set(batch.embedding_keys())
    problems = []
    for lab, step in zip(recipe.labels(), recipe.steps):
        need_cols, need_keys = step.requires()
        for c in need_cols:
            if c not in cols:
                problems.append(f"step '{lab}' needs column '{c}' (available: {', '.join(sorted(cols))})")
        for k in need_keys:
            if k not in keys:
                problems.append(f"step '{lab}' needs embedding '{k}' (available: {', '.join(sorted(keys))})")
    if problems:
        raise ParamsError(f"recipe '{recipe.name}' cannot run on this pool:\n  " + "\n  ".join(problems))


def _verdicts(steps: list[Step], pool: Pool, shard: str, done: str | None = None) -> list[np.ndarray]:
    """Each step's verdict on every sample of one shard (bool keep, or int multiplicity). With
    ``done`` (a file in the run's work directory) a shard decided before is read back, and a newly
    decided one is saved there, so a killed filter resumes without redoing finished shards."""
    if done and Path(done).exists():
        with np.load(done, allow_pickle=False) as z:
            return [z[f"v{i}"] for i in range(len(steps))]
    out = _decide(steps, pool, shard)
    if done:
        with atomic_file(done) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **{f"v{i}": v for i, v in enumerate(out)})
    return out


def _decide(steps: list[Step], pool: Pool, shard: str) -> list[np.ndarray]:
    batch = pool.batch(shard)
    out = []
    for step in steps:
        v = np.asarray(step.keep(batch))
        if v.shape != (len(batch),):
            raise RuntimeError(f"step '{step.label()}' returned shape {v.shape} for {len(batch)} samples in {shard}")
        out.append(v)
    return out


def _explain(recipe: Recipe, pool: Pool, shard: str) -> dict[str, np.ndarray]:
    batch = pool.batch(shard)
    cols = {"uid": batch.column("uid")}
    for lab, step in zip(recipe.labels(), recipe.steps):
        for k, v in step.explain(batch).items():
            cols[f"{k}:{lab}"] = np.asarray(v)
    return cols


def run(recipe: Recipe, pool: Pool, out_dir: str, executor: str = "serial", workers: int = 1,
        address: str | None = None, work_dir: str | None = None) -> dict:
    """Decide every sample, step by step, and write uids.npy + decisions.parquet. Returns the funnel.

    Consecutive per-sample steps share one pass over the shards; a global step first fits on the
    survivors of the steps before it. Only per-shard verdict arrays (bytes per sample) are kept.
    """
    try:
        return _run(recipe, pool, out_dir, executor, workers, address, work_dir)
    finally:
        release()


def _work(recipe: Recipe, pool: Pool, work_dir: str | None) -> Path | None:
    """The run's work directory, keyed by the recipe (every step's parameters) and the inputs' manifests;
    other keys' leftovers are removed."""
    if not work_dir:
        return None
    inputs = [json.dumps(recipe.model_dump(mode="json", exclude={"steps"}), sort_keys=True),
              json.dumps([s.kind for s in recipe.steps] + [s.model_dump(mode="json") for s in recipe.steps], sort_keys=True),
              json.dumps(pool.manifest, sort_keys=True), pool.uri]
    if pool.embed_uri and wio.exists(m := wio.join(pool.embed_uri, "meta.json")):
        inputs.append(wio.read_bytes(m).decode())
    return keyed_work_dir(work_dir, hashlib.sha256("\n".join(inputs).encode()).hexdigest()[:16])


def _run(recipe: Recipe, pool: Pool, out_dir: str, executor: str, workers: int, address: str | None,
         work_dir: str | None = None) -> dict:
    pool, quarantined = probe_shards(recipe, pool)
    check_requirements(recipe, pool)
    work = _work(recipe, pool, work_dir)
    labels, steps = recipe.labels(), recipe.steps
    verdicts: dict[str, list[np.ndarray]] = {s: [] for s in pool.shards}

    def alive(shard: str) -> np.ndarray:
        vs = verdicts[shard]
        n = len(vs[0]) if vs else len(pool.batch(shard))
        m = np.ones(n, bool)
        for v in vs:
            m &= v > 0
        return m

    i = 0
    while i < len(steps):
        if steps[i].needs_fit():
            steps[i].fit(pool, alive)
        j = i + 1
        while j < len(steps) and not steps[j].needs_fit():
            j += 1
        group = steps[i:j]
        args = [(group, pool, s, str(work / f"{i}-{s}.npz") if work else None) for s in pool.shards]
        desc = f"filter {recipe.name}: {', '.join(labels[i:j])}"
        for shard, vs in tqdm(zip(pool.shards, map_shards(_verdicts, args, executor, workers, address)),
                              total=len(pool.shards), desc=desc, unit="shard"):
            verdicts[shard] += vs
        i = j
    out = local(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_after = np.zeros(len(steps), np.int64)
    n_standalone = np.zeros(len(steps), np.int64)
    kept_parts, total = [], 0
    with atomic_file(out / "decisions.parquet") as tmp:
        writer = None
        args = [(recipe, pool, s) for s in pool.shards]
        for shard, cols in zip(pool.shards, map_shards(_explain, args, executor, workers, address)):
            vs = verdicts.pop(shard)
            n = len(cols["uid"])
            total += n
            alive_m = np.ones(n, bool)
            mult = np.ones(n, np.int64)
            dropped_by = np.full(n, None, dtype=object)
            for k, (lab, v) in enumerate(zip(labels, vs)):
                keep = v > 0
                n_standalone[k] += int((~keep).sum())
                if v.dtype != bool:
                    mult = np.where(keep, mult * v.astype(np.int64), mult)
                dropped_by[alive_m & ~keep] = lab
                alive_m &= keep
                n_after[k] += int(alive_m.sum())
                cols[f"keep:{lab}"] = keep
            cols.update(shard=np.full(n, shard), dropped_by=dropped_by, multiplicity=np.where(alive_m, mult, 0))
            kept_parts.append(np.repeat(cols["uid"][alive_m], cols["multiplicity"][alive_m]))
            table = pa.table(cols)
            if writer is None:
                schema = table.schema
                writer = pq.ParquetWriter(tmp, schema)
            writer.write_table(table.cast(schema))
        if writer:
            writer.close()
    uids = U.hex_to_array(np.concatenate(kept_parts) if kept_parts else np.array([], str))
    U.save(out / "uids.npy", uids)
    if work:        # complete: the per-shard verdicts are not needed any more
        shutil.rmtree(work, ignore_errors=True)
    prev = total
    funnel_steps = []
    for k, (lab, step) in enumerate(zip(labels, steps)):
        funnel_steps.append({"step": lab, "kind": step.kind, "params": step.model_dump(exclude_none=True),
                             "state": step.state(), "kept_after": int(n_after[k]),
                             "dropped_here": int(prev - n_after[k]), "dropped_standalone": int(n_standalone[k])})
        prev = int(n_after[k])
    return {"recipe": recipe.name, "pool_size": total, "kept_unique": int(prev), "subset_size": int(len(uids)),
            "kept_fraction": (prev / total) if total else 0.0, "steps": funnel_steps,
            "bounds": recipe.bounds.model_dump(), "quarantined_shards": quarantined}


def truth_metrics(decisions: pd.DataFrame, truth: pd.DataFrame, labels: list[str]) -> dict:
    """Per step and noise kind, on the demo: recall (share of that kind the step drops, standalone)
    and precision (share of the step's drops that are that kind). 'clean' recall is collateral loss."""
    df = decisions.merge(truth[["uid", "kind"]], on="uid", how="left")
    kinds = sorted(df.kind.dropna().unique())
    out = {}
    for lab in labels + ["recipe"]:
        dropped = (df.multiplicity == 0) if lab == "recipe" else ~df[f"keep:{lab}"]
        nd = int(dropped.sum())
        out[lab] = {k: {"recall": float((dropped & (df.kind == k)).sum() / max(1, (df.kind == k).sum())),
                        "precision": float((dropped & (df.kind == k)).sum() / nd) if nd else 0.0}
                    for k in kinds}
    return out
