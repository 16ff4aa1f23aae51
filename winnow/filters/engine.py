"""The recipe engine: an ordered list of steps, run shard by shard, with a funnel of what each removed.

Steps run in recipe order, vectorised over a shard. With ``decide: survivors`` (the default) a
step decides only the samples every earlier step kept, as a funnel does — expensive steps (language
id) never run on what a cheap one already dropped; with ``decide: all`` every step decides every
sample, so each step's standalone effect is known too. The funnel attributes a dropped sample to
the first step, in recipe order, that dropped it. Global steps ``fit`` over the pool first, as
map-reduce passes on the executor where they can. Memory is a shard plus global state.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from winnow import io as wio
from winnow import jobs
from winnow.config import CONFIGS, ParamsError, load_yaml, validate_model
from winnow.executor import SERIAL, Executor
from winnow.filters import Step, build_step
from winnow.io import atomic_file, local
from winnow.pool import uids as U
from winnow.pool import verified as pool_verified
from winnow.pool.shards import ShardError
from winnow.pool.view import Pool


class Bounds(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_fraction: float = Field(0.0, ge=0, le=1)
    max_fraction: float = Field(1.0, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_fraction > self.max_fraction:
            raise ValueError(f"min_fraction {self.min_fraction} is above max_fraction {self.max_fraction}: "
                             "no subset could pass the filter gate")
        return self


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    name: str
    description: str = ""
    bounds: Bounds = Bounds()
    corrupt_shards: Literal["fail", "quarantine"] = "fail"   # quarantine: skip, count, report
    targets: dict[str, str | list[str]] = {}   # task -> embeddings file: image targets of alignment steps (winnow.targets)
    steps: list[Step] = []

    def labels(self) -> list[str]:
        return _labels([s.label() for s in self.steps])

    def step_files(self) -> list[str]:
        """The files the steps read (word lists, language-id models, centroids), in step order."""
        return [f for s in self.steps for f in s.files()]

    def target_files(self) -> list[str]:
        """The embeddings files of ``targets``, sorted."""
        return sorted(str(f) for fs in self.targets.values() for f in ([fs] if isinstance(fs, str) else fs))

    def input_files(self) -> list[str]:
        """Every file the recipe reads besides the pool, sorted: what its results depend on."""
        return sorted({*self.step_files(), *self.target_files()})


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


def check_tracked(name: str | dict) -> None:
    """A recipe the pipeline runs must be one DVC tracks: a name in configs/recipes (the filter and
    plan stages depend on that directory), or inline in params.yaml (DVC tracks ``filter``). A path
    elsewhere would let the recipe change without DVC re-running anything, so it is refused."""
    if isinstance(name, dict) or not name.endswith((".yaml", ".yml")):
        return
    path = Path(name).resolve()
    tracked = {(CONFIGS / "recipes").resolve(), Path("configs/recipes").resolve()}   # the package's, the project's
    if not tracked & set(path.parents):
        raise ParamsError(f"filter.recipe {name} lies outside configs/recipes/, so DVC would not re-run the filter "
                          f"when it changes: copy it into configs/recipes/ (then name it: filter.recipe: {Path(name).stem}) "
                          "or write it inline in params.yaml")


def params_recipe(f) -> Recipe:
    """The recipe params.yaml's ``filter`` section names, with its overrides and targets files —
    the one a pipeline runs, so it must be tracked by DVC (check_tracked)."""
    check_tracked(f.recipe)
    return load_recipe(f.recipe, f.overrides, f.targets)


def raw_recipe(name: str | dict) -> tuple[dict, str]:
    """A recipe as written, before validation, and where it was written: a named recipe from
    configs/recipes, a path to a recipe YAML, or an inline mapping (params.yaml)."""
    if isinstance(name, dict):
        return {"name": "inline"} | dict(name), "params.yaml filter.recipe"
    p = Path(name) if name.endswith((".yaml", ".yml")) else CONFIGS / "recipes" / f"{name}.yaml"
    if not p.exists():
        raise ParamsError(f"unknown filter.recipe '{name}' (valid: {', '.join(recipe_names())}; "
                          "or a path to a recipe .yaml, or an inline mapping with 'steps')")
    return load_yaml(p), p.name


def load_recipe(name: str | dict, overrides: dict | None = None, targets: dict | None = None) -> Recipe:
    """A named recipe from configs/recipes, a path to a recipe YAML, or a recipe written inline in
    params.yaml (a mapping with ``name``, ``steps`` …), with per-step parameter overrides
    ``{step label: {field: value}}`` (params.yaml ``filter.overrides``); validated before any data
    is read."""
    raw, where = raw_recipe(name)
    if isinstance(name, dict):
        name = str(raw["name"])
    specs = [dict(s or {}) for s in raw.pop("steps", None) or []]
    labels = _labels([s.get("name") or s.get("step") for s in specs])
    for lab, fields in (overrides or {}).items():
        if lab not in labels:
            raise ParamsError(f"filter.overrides: recipe '{name}' has no step '{lab}' (steps: {', '.join(labels)})")
        if not isinstance(fields, dict):
            raise ParamsError(f"filter.overrides.{lab} must map field names to values")
        specs[labels.index(lab)].update(fields)
    steps = [build_step(s, f"{where} steps[{i}] ({labels[i]})") for i, s in enumerate(specs)]
    recipe = validate_model(Recipe, raw | {"steps": []}, where)
    recipe.steps = steps
    recipe.targets = recipe.targets | dict(targets or {})   # params.yaml filter.targets wins
    return recipe


def _probe(recipe: Recipe, pool: Pool, verified: bool, shard: str) -> tuple[str | None, list[str]]:
    """Why a shard cannot be read (uids, and the row counts of the embeddings the recipe needs), or
    None; and the recipe's inputs (columns and embedding keys) the shard has. ``verified``: the
    pool gate read these very files through (winnow.pool.verified), so the footer's row count is
    trusted; otherwise the uids are read, and a corrupt page is found here."""
    cols = sorted({c for s in recipe.steps for c in s.requires()[0]})
    keys = sorted({k for s in recipe.steps for k in s.requires()[1]})
    try:
        b = pool.batch(shard)
        n = len(b) if verified else len(b.arrow("uid"))
        have = [c for c in cols if c in b.columns()] + [k for k in keys if k in b.embedding_keys()]
        for k in (k for k in keys if k in b.embedding_keys()):
            if (rows := b.embedding_rows(k)) != n:
                raise ShardError(f"shard {shard}: embedding '{k}' has {rows} rows, metadata {n}")
    except (ShardError, KeyError, OSError, ValueError) as exc:
        return str(exc), []
    return None, have


def probe_shards(recipe: Recipe, pool: Pool, executor: Executor = SERIAL) -> tuple[Pool, list[dict]]:
    """A shard that cannot be read fails the run naming it, or — when the recipe says
    ``corrupt_shards: quarantine`` — is left out and reported with its error. So does a shard that
    lacks an input the first readable shard has (one the pool lacks altogether is named, with the
    valid choices, by check_requirements)."""
    verified = pool_verified.is_verified(pool)
    # a verified local pool's probe reads footers only: cheaper in this process than shipped to
    # workers (a remote pool's shards are fetched whole, so those stay on the executor)
    serial = verified and not wio.is_remote(pool.uri)
    results = list((SERIAL if serial else executor).map(_probe, [(recipe, pool, verified, s) for s in pool.shards],
                                                          name=f"filter {recipe.name}: probe"))
    errors = [e for e, _ in results]
    first = next((have for e, have in results if e is None), [])
    for k, (e, have) in enumerate(results):
        if e is None and (lacks := sorted(set(first) - set(have))):
            errors[k] = f"shard {pool.shards[k]}: lacks {', '.join(lacks)}, which the recipe reads and other shards have"
    bad = [{"shard": s, "error": e} for s, e in zip(pool.shards, errors) if e]
    if bad and recipe.corrupt_shards == "fail":
        raise ShardError(f"{bad[0]['error']} (set `corrupt_shards: quarantine` in the recipe to skip such shards)")
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


# A verdict is an int array per step and shard: 1/0 keep/drop (int8) or a multiplicity (int32);
# UNDECIDED marks samples a step never saw because an earlier step had dropped them.
UNDECIDED = -1
DECIDE = ("survivors", "all")


def _encode(step: Step, v, n: int, shard: str) -> np.ndarray:
    v = np.asarray(v)
    if v.shape != (n,):
        raise RuntimeError(f"step '{step.label()}' returned shape {v.shape} for {n} samples in {shard}")
    if v.dtype == bool:
        return v.astype(np.int8)
    if np.issubdtype(v.dtype, np.integer):
        return v.astype(np.int32)
    raise RuntimeError(f"step '{step.label()}' returned {v.dtype}; expected a bool mask or int multiplicities")


def _load(path: str) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return [z[f"v{i}"] for i in range(len(z.files))]


def _apply(copies: np.ndarray, step: Step, v: np.ndarray) -> np.ndarray:
    """The copies after one more step's verdict (0: dropped): a multiplicity verdict multiplies
    them, a ``sets_copies`` step's (rebalance) replaces them."""
    keep = (v > 0) & (copies > 0)      # (decide: all) a dropped sample stays dropped
    if v.dtype == np.int32:
        return np.where(keep, v if step.sets_copies else copies * v, 0)
    return np.where(keep, copies, 0)


def _copies(steps: list[Step], verdicts: list[np.ndarray], n: int) -> np.ndarray:
    """Each sample's number of copies after these steps (0: dropped)."""
    copies = np.ones(n, np.int64)
    for step, v in zip(steps, verdicts):
        copies = _apply(copies, step, v)
    return copies


def _verdict(step: Step, batch, fit, copies: np.ndarray):
    return step.verdict(batch, fit, copies) if step.sets_copies else step.verdict(batch, fit)


def _needs_image(step: Step, batch) -> bool:
    return batch.pool.is_download and batch.from_images(*step.requires())


def with_download_gate(recipe: Recipe, pool: Pool) -> Recipe:
    """On DataComp's download layout, the recipe with a ``downloaded`` step before its first step
    that reads what the embed stage computed from images: that step and every later one see only
    samples with an image, and the funnel shows what was not downloaded as a line of its own.
    Recipes that decide on metadata alone are unchanged (DataComp's baselines count every row)."""
    if not pool.is_download or any(s.kind == "downloaded" for s in recipe.steps):
        return recipe
    batch = pool.batch(pool.shards[0])
    for i, step in enumerate(recipe.steps):
        if _needs_image(step, batch):
            from winnow.filters.image import Downloaded

            return recipe.model_copy(update={"steps": recipe.steps[:i] + [Downloaded()] + recipe.steps[i:]})
    return recipe


def _decide(steps: list[Step], fitted: list, batch, earlier: list[Step], prior: list[np.ndarray],
            decide: str) -> tuple[list[np.ndarray], list[float]]:
    """Each step's verdicts on one shard, and the seconds each took, given the ``earlier`` steps'
    verdicts ``prior``. ``survivors``: a step decides only the samples every step
    before it kept (so language id never runs on what a cheap size check already dropped); ``all``:
    every step decides every sample, so each step's standalone effect is known — except that a step
    reading image-derived values never sees a sample without an image (download layout). A
    ``sets_copies`` step deciding a sample earlier steps dropped (``all``) counts it as one copy."""
    shard, copies = batch.shard, _copies(earlier, prior, len(batch))
    out, seconds = [], []
    for step, fit in zip(steps, fitted):
        t0 = time.perf_counter()
        alive = copies > 0
        image_rows = batch.column("downloaded").astype(bool) if _needs_image(step, batch) else None
        if decide == "all" and image_rows is None:
            v = _encode(step, _verdict(step, batch, fit, np.maximum(copies, 1)), len(batch), shard)
        else:
            mask = alive if decide != "all" else np.ones(len(batch), bool)
            rows = np.flatnonzero(mask if image_rows is None else mask & image_rows)
            v = np.full(len(batch), UNDECIDED, np.int8)
            if len(rows):
                r = _encode(step, _verdict(step, batch.select(rows), fit, np.maximum(copies[rows], 1)), len(rows), shard)
                v = v.astype(r.dtype)
                v[rows] = r
        copies = _apply(copies, step, v)
        out.append(v)
        seconds.append(time.perf_counter() - t0)
    return out, seconds


def _prior(work: Path, starts: list[int], shard: str) -> list[str]:
    """The verdict files of the groups (by start index) already decided for this shard."""
    return [str(work / f"{i}-{shard}.npz") for i in starts]


def _prior_verdicts(work: Path, starts: list[int], shard: str) -> list[np.ndarray]:
    """The verdicts of every step of the groups already decided for this shard, in step order."""
    return [v for f in _prior(work, starts, shard) for v in _load(f)]


def _decide_group(steps: list[Step], fitted: list, start: int, starts: list[int], pool: Pool, work: Path,
                  decide: str, unit: str) -> dict:
    """One group's verdicts on one shard (a unit of a pass), written to the work directory.
    ``steps``: the recipe's steps up to the group's end; the group starts at ``start``."""
    batch = pool.batch(unit)
    prior = _prior_verdicts(work, starts, unit)
    out, seconds = _decide(steps[start:], fitted, batch, steps[:start], prior, decide)
    with atomic_file(work / f"{start}-{unit}.npz", jobs.UNIT_DURABLE) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **{f"v{i}": v for i, v in enumerate(out)})
    return {"seconds": seconds}


def _fit_part(step: Step, earlier: list[Step], state, pool: Pool, work: Path, starts: list[int], pass_no: int,
              unit: str):
    batch = pool.batch(unit)
    copies = _copies(earlier, _prior_verdicts(work, starts, unit), len(batch))
    return step.fit_shard(batch, copies if step.sets_copies else copies > 0, pass_no, state)


def _finish(recipe: Recipe, fitted: list, pool: Pool, work: Path, starts: list[int], last: int, decide: str,
            decisions: bool, unit: str) -> dict:
    """The last group's verdicts on one shard, then the shard's rows of decisions.parquet and its
    kept uids (repeated per multiplicity), written to the work directory, and its funnel counts —
    all on the worker, in one read of the shard; the driver merges."""
    steps, labels = recipe.steps, recipe.labels()
    batch = pool.batch(unit)
    vs = _prior_verdicts(work, starts, unit)   # the earlier groups' verdicts, read once
    last_vs, seconds = _decide(steps[last:], fitted[last:], batch, steps[:last], vs, decide)
    vs += last_vs
    uid = batch.arrow("uid")
    n = len(uid)
    cols: dict = {"uid": uid}
    for lab, step, fit in zip(labels, steps, fitted) if decisions else ():
        for k, v in step.explain(batch, fit).items():
            cols[f"{k}:{lab}"] = np.asarray(v)
    alive = np.ones(n, bool)
    dropped_by = np.full(n, -1, np.int32)       # index of the step that dropped the sample; -1: kept
    counts = {"n": n, "after": [], "decided": [], "dropped": [], "seconds": seconds}
    for k, (lab, v) in enumerate(zip(labels, vs)):
        keep, decided = v > 0, v != UNDECIDED
        dropped_by[alive & ~keep] = k
        alive &= keep
        counts["after"].append(int(alive.sum()))
        counts["decided"].append(int(decided.sum()))
        counts["dropped"].append(int((decided & ~keep).sum()))
        if decisions:
            cols[f"keep:{lab}"] = pa.array(keep, mask=~decided)     # null: the step never saw the sample
    mult = _copies(steps, vs, n)
    if pool.is_download:   # selected by the metadata but never downloaded: reshard cannot write them
        image = batch.column("downloaded").astype(bool)
        counts["download"] = {"downloaded": int(image.sum()), "kept_without_image": int((alive & ~image).sum())}
    if decisions:
        names = pa.array(labels or [""], pa.string())
        cols.update(shard=pa.repeat(pa.scalar(unit, pa.string()), n),   # not via NumPy's str: 50x the time
                    dropped_by=pa.DictionaryArray.from_arrays(pa.array(dropped_by, mask=dropped_by < 0), names).cast(pa.string()),
                    multiplicity=mult)
        table = pa.table(cols)
        with atomic_file(work / f"decisions-{unit}.arrow", jobs.UNIT_DURABLE) as tmp:
            # a part is read back once, by _merge: Arrow IPC, written and memory-mapped as it is
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
                w.write_table(table)
    with atomic_file(work / f"kept-{unit}.npy", jobs.UNIT_DURABLE) as tmp, open(tmp, "wb") as fh:
        kept = U.hex_to_array(uid.filter(pa.array(alive)), sort=False)    # only kept uids are parsed, as before
        np.save(fh, U.sort_uids(np.repeat(kept, mult[alive])), allow_pickle=False)
    counts["subset"] = int(mult[alive].sum())
    return counts


def run(recipe: Recipe, pool: Pool, out_dir: str, executor: Executor = SERIAL, work_root: str | None = None,
        decide: str = "survivors", decisions: bool = True) -> dict:
    """Decide every sample, step by step, and write uids.npy + decisions.parquet (with
    ``decisions=False`` only uids.npy: the per-sample table is most of a metadata-only run's
    time at pool scale). Returns the funnel.

    Consecutive per-sample steps share one pass over the shards; a global step first fits on the
    survivors of the steps before it. Each pass is a job whose units are shards: per-shard verdicts
    live in the run's work directory (keyed by every input, winnow.jobs; a temporary one without
    ``work_root``), never in the driver's memory, and a killed run resumes from them.
    """
    if decide not in DECIDE:
        raise ParamsError(f"unknown filter.decide '{decide}' (valid: {', '.join(DECIDE)})")
    tmp = None if work_root else tempfile.mkdtemp(prefix="winnow-filter-")
    try:
        return _run(recipe, pool, out_dir, executor, work_root or tmp, decide, decisions)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def work_key(recipe: Recipe, pool: Pool, decide: str, decisions: bool = True) -> jobs.Key:
    """Every input of a filter run: the recipe (each step's kind and parameters), the mode, the
    content of the pool's files, the embed stage's outputs and the target files, and the code."""
    key = jobs.Key("filter").params(recipe=recipe.model_dump(mode="json", exclude={"steps"}),
                                    steps=[[s.kind, s.model_dump(mode="json")] for s in recipe.steps], decide=decide,
                                    decisions=decisions,
                                    manifest=pool.manifest)
    return key.files(pool=pool.uri, images=pool.images_uri if pool.is_download else None, embed=pool.embed_uri,
                     targets=recipe.target_files(), step_files=recipe.step_files()).code(__name__, *sorted({type(s).__module__ for s in recipe.steps}))


def _groups(steps: list[Step]) -> list[tuple[int, int]]:
    """[start, end) runs of steps: each starts at the recipe's start or at a global step and takes
    the per-sample steps after it, which share its pass over the shards."""
    starts = [0] + [i for i, s in enumerate(steps) if i and s.needs_fit()]
    return list(zip(starts, starts[1:] + [len(steps)])) if steps else []


def _run(recipe: Recipe, pool: Pool, out_dir: str, executor: Executor, work_root: str, decide: str,
         decisions: bool) -> dict:
    pool, quarantined = probe_shards(recipe, pool, executor)
    check_requirements(recipe, pool)
    recipe = with_download_gate(recipe, pool)
    work = jobs.WorkDir("filter", work_key(recipe, pool, decide, decisions), work_root, unsynced=True)
    path = work.path
    pool = replace(pool, scratch=str(path / "derived"), target_files=dict(recipe.targets))
    labels, steps = recipe.labels(), recipe.steps
    seconds = np.zeros(len(steps))        # per step: fit in the driver + decide summed over shards
    fitted: list = [None] * len(steps)   # what each global step learned; steps themselves never change
    starts: list[int] = []                # the groups decided so far
    groups = _groups(steps)
    for g, (i, j) in enumerate(groups):
        head = steps[i]
        t0 = time.time()
        if head.needs_fit():
            fitted[i] = _fit(head, steps[:i], labels[i], recipe.name, pool, path, list(starts), executor)
        seconds[i] += time.time() - t0
        if g == len(groups) - 1:
            break       # the last group is decided in the final pass, with the decisions
        group = jobs.Job(f"filter {recipe.name}: {', '.join(labels[i:j])}", [f"{i}-{s}" for s in pool.shards],
                         partial(_unit_shard, partial(_decide_group, steps[:j], fitted[i:j], i, list(starts), pool, path,
                                                      decide)))
        for stats in jobs.run(group, executor, work):
            seconds[i:j] += stats["seconds"]
        starts.append(i)

    last = groups[-1][0] if groups else 0
    desc = ", ".join(labels[last:]) + " + decisions" if groups else "decisions"
    out = local(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts: list[dict] = []

    def arrived(pairs):     # the shards' stats in shard order, as their final pass completes
        for unit, stats in pairs:
            parts.append(stats)
            yield path / f"{unit}.arrow"

    def merge(pairs):       # decisions.parquet is written while later shards are still being decided
        if decisions:
            _merge_decisions(arrived(pairs), out / "decisions.parquet")
        else:               # not asked for: an earlier run's table must not pass for this run's
            for _ in arrived(pairs):
                pass
            (out / "decisions.parquet").unlink(missing_ok=True)

    jobs.run(jobs.Job(f"filter {recipe.name}: {desc}", [f"decisions-{s}" for s in pool.shards],
                      partial(_unit_shard, partial(_finish, recipe, fitted, pool, path, list(starts), last, decide,
                                                   decisions)), reduce=merge), executor, work)
    funnel = _merge(recipe, fitted, pool, parts, path, out, decide)
    for k, t in enumerate(sum((np.asarray(p.pop("seconds"), float) for p in parts), np.zeros(len(steps) - last))):
        seconds[last + k] += t
    work.release()     # complete: the per-shard verdicts are not needed any more
    for f, t in zip(funnel["steps"], seconds):
        f["seconds"] = round(float(t), 3)
    return funnel | {"quarantined_shards": quarantined}


def _fit(step: Step, earlier: list[Step], label: str, recipe: str, pool: Pool, work: Path, starts: list[int],
         executor: Executor):
    """A global step's fitted value: its map-reduce passes over the shards (each a job; cheap to
    redo, so not recorded), or its own fit over the pool. ``earlier``: the steps before it."""
    if not step.fit_passes:
        def alive(shard):
            copies = _copies(earlier, _prior_verdicts(work, starts, shard), len(pool.batch(shard)))
            return copies if step.sets_copies else copies > 0
        # its own working directory: two steps of the same kind and parameters must not share one
        return step.fit(pool.fitting(label), alive)   # its own directory: equal steps must not share one
    state = step.fit_begin(pool)
    for p in range(step.fit_passes):
        state = jobs.run(jobs.Job(f"filter {recipe}: fit {label} ({p + 1}/{step.fit_passes})", pool.shards,
                                  partial(_fit_part, step, earlier, state, pool, work, starts, p),
                                  reduce=lambda parts, p=p, state=state: step.fit_reduce((x for _, x in parts), p, state)),
                         executor)
    return state


def _unit_shard(fn, unit: str):
    """A pass's unit is named ``<pass>-<shard>``: the shard is what the step function reads."""
    return fn(unit.split("-", 1)[1])


DECISIONS_ROW_GROUP = 131_072    # rows per row group of decisions.parquet: a few shards' parts each


def _decisions_layout(schema: pa.Schema) -> dict:
    """decisions.parquet's writer options: dictionary pages only where values repeat (shard,
    dropped_by), and the random-hex uids neither compressed nor given statistics — they gain
    nothing from either and were most of the file's write time."""
    return {"use_dictionary": ["shard", "dropped_by"], "write_statistics": [n for n in schema.names if n != "uid"],
            "compression": {n: "none" if n == "uid" else "snappy" for n in schema.names}}


def _merge_decisions(part_files, dest: Path) -> None:
    """decisions.parquet from the shards' parts, in shard order, a row group per few parts."""
    with atomic_file(dest) as tmp:
        writer, empty, pending = None, None, []

        def flush():
            writer.write_table(pa.concat_tables(pending), row_group_size=DECISIONS_ROW_GROUP)
            pending.clear()

        for f in part_files:
            table = pa.ipc.open_file(pa.memory_map(str(f))).read_all()   # the map lives as long as the table
            if table.num_rows == 0:      # an empty shard's null-typed columns must not fix the schema
                empty = table if empty is None else empty
                continue
            if writer is None:
                schema = table.schema
                writer = pq.ParquetWriter(tmp, schema, **_decisions_layout(schema))
            pending.append(table.cast(schema))
            if sum(t.num_rows for t in pending) >= DECISIONS_ROW_GROUP:
                flush()
        if writer is None and empty is not None:   # every shard empty: the file still has its columns
            writer = pq.ParquetWriter(tmp, empty.schema)
            writer.write_table(empty)
        elif pending:
            flush()
        if writer:
            writer.close()


def _merge(recipe: Recipe, fitted: list, pool: Pool, parts: list[dict], work: Path, out: Path, decide: str) -> dict:
    """uids.npy from the shards' kept parts, and the funnel from their counts."""
    steps, labels = recipe.steps, recipe.labels()
    n_after, n_decided, n_dropped = (np.zeros(len(steps), np.int64) for _ in range(3))
    total = 0
    download = {"downloaded": 0, "kept_without_image": 0}
    for part in parts:
        total += part["n"]
        n_after += np.asarray(part["after"], np.int64)
        n_decided += np.asarray(part["decided"], np.int64)
        n_dropped += np.asarray(part["dropped"], np.int64)
        for k, v in part.get("download", {}).items():
            download[k] += v
    # each part is sorted (by its worker): the sort of their concatenation only merges runs
    U.save(out / "uids.npy", U.sort_uids(np.concatenate([np.load(work / f"kept-{s}.npy", allow_pickle=False)
                                                        for s in pool.shards]), runs=True))
    prev = total
    funnel_steps = []
    for k, (lab, step) in enumerate(zip(labels, steps)):
        funnel_steps.append({"step": lab, "kind": step.kind, "params": step.model_dump(exclude_none=True),
                             "state": step.report(fitted[k]), "decided": int(n_decided[k]), "kept_after": int(n_after[k]),
                             "dropped_here": int(prev - n_after[k]), "dropped_standalone": int(n_dropped[k])})
        prev = int(n_after[k])
    subset = int(sum(p["subset"] for p in parts))
    return {"recipe": recipe.name, "decide": decide, "pool_size": total, "kept_unique": int(prev),
            "subset_size": subset, "kept_fraction": (prev / total) if total else 0.0, "steps": funnel_steps,
            "bounds": recipe.bounds.model_dump(),
            **({"download": {"pool_rows": total, "not_downloaded": total - download["downloaded"], **download}}
               if pool.is_download else {})}
