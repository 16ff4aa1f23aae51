"""The recipe engine: an ordered list of steps, run shard by shard, with a funnel of what each removed.

Every step decides on every sample of a shard (vectorised), so each step's own effect is known
("standalone"); the funnel attributes a dropped sample to the first step, in recipe order, that
dropped it. Global steps ``fit`` over the whole pool first. Memory is one shard plus global state.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from winnow.compute import map_shards
from winnow.config import CONFIGS, ParamsError, load_yaml, validate_model
from winnow.filters import Step, build_step
from winnow.io import atomic_file, local
from winnow.pool import uids as U
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
    steps: list[Step] = []

    def labels(self) -> list[str]:
        seen: dict[str, int] = {}
        out = []
        for s in self.steps:
            lab = s.label()
            seen[lab] = seen.get(lab, 0) + 1
            out.append(lab if seen[lab] == 1 else f"{lab}#{seen[lab]}")
        return out


def recipe_names() -> list[str]:
    return sorted(p.stem for p in (CONFIGS / "recipes").glob("*.yaml"))


def load_recipe(name: str) -> Recipe:
    """A named recipe from configs/recipes, or a path to a recipe YAML; validated before any data is read."""
    p = Path(name) if name.endswith((".yaml", ".yml")) else CONFIGS / "recipes" / f"{name}.yaml"
    if not p.exists():
        raise ParamsError(f"unknown filter.recipe '{name}' (valid: {', '.join(recipe_names())})")
    raw = load_yaml(p)
    steps = [build_step(s, f"{p.name} steps[{i}]") for i, s in enumerate(raw.pop("steps", None) or [])]
    recipe = validate_model(Recipe, raw | {"steps": []}, str(p))
    recipe.steps = steps
    return recipe


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


def decide_shard(recipe: Recipe, pool: Pool, shard: str) -> pd.DataFrame:
    """Per-sample decisions of one shard: each step's verdict, who dropped it, multiplicity."""
    batch = pool.batch(shard)
    n = len(batch)
    out = {"uid": batch.column("uid"), "shard": np.full(n, shard)}
    alive = np.ones(n, bool)
    dropped_by = np.full(n, None, dtype=object)
    mult = np.ones(n, np.int64)
    for lab, step in zip(recipe.labels(), recipe.steps):
        verdict = np.asarray(step.keep(batch))
        if verdict.shape != (n,):
            raise RuntimeError(f"step '{lab}' returned shape {verdict.shape} for {n} samples")
        keep = verdict > 0
        out[f"keep:{lab}"] = keep
        if verdict.dtype != bool:   # an up-sampling step: integer multiplicities
            mult = np.where(keep, mult * verdict.astype(np.int64), mult)
        dropped_by[alive & ~keep] = lab
        alive &= keep
    out["dropped_by"] = dropped_by
    out["multiplicity"] = np.where(alive, mult, 0)
    return pd.DataFrame(out)


def run(recipe: Recipe, pool: Pool, out_dir: str, executor: str = "serial", workers: int = 1) -> dict:
    """Fit global steps, decide every shard, write uids.npy + decisions.parquet. Returns the funnel."""
    check_requirements(recipe, pool)
    for step in recipe.steps:
        step.fit(pool)
    out = local(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = recipe.labels()
    kept_parts, total = [], 0
    n_after = np.zeros(len(labels), np.int64)
    n_standalone = np.zeros(len(labels), np.int64)
    schema = None
    with atomic_file(out / "decisions.parquet") as tmp:
        writer = None
        results = map_shards(decide_shard, [(recipe, pool, s) for s in pool.shards], executor, workers)
        for df in tqdm(results, total=len(pool.shards), desc=f"filter {recipe.name}", unit="shard"):
            total += len(df)
            for i, lab in enumerate(labels):
                n_standalone[i] += int((~df[f"keep:{lab}"]).sum())
                n_after[i] += int(df[[f"keep:{x}" for x in labels[: i + 1]]].all(axis=1).sum())
            kept = df[df.multiplicity > 0]
            kept_parts.append(np.repeat(kept.uid.to_numpy(), kept.multiplicity.to_numpy()))
            table = pa.Table.from_pandas(df, preserve_index=False)
            if writer is None:
                schema = table.schema
                writer = pq.ParquetWriter(tmp, schema)
            writer.write_table(table.cast(schema))
        if writer:
            writer.close()
    uids = U.hex_to_array(np.concatenate(kept_parts) if kept_parts else np.array([], str))
    U.save(out / "uids.npy", uids)
    prev = total
    steps = []
    for i, (lab, step) in enumerate(zip(labels, recipe.steps)):
        steps.append({"step": lab, "kind": step.kind, "params": step.model_dump(exclude_none=True),
                      "state": step.state(), "kept_after": int(n_after[i]),
                      "dropped_here": int(prev - n_after[i]), "dropped_standalone": int(n_standalone[i])})
        prev = int(n_after[i])
    return {"recipe": recipe.name, "pool_size": total, "kept_unique": int(prev), "subset_size": int(len(uids)),
            "kept_fraction": (prev / total) if total else 0.0, "steps": steps,
            "bounds": recipe.bounds.model_dump()}


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
