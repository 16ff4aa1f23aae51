"""Every check of the configuration that can run before DVC removes a stage's outputs.

DVC deletes a stage's outputs before it runs it, so a value that fails inside a stage (an unknown
``train.scale`` in ``train``, a missing ``pool.uri`` in ``pool``, a misspelt ``filter.recipe`` in
``plan``) would destroy the last good outputs. The ``check`` stage (stages/check.py), first in
dvc.yaml and upstream of every other stage, runs these checks over everything it reads; so do
``winnow check`` / ``winnow run``, the Prefect flow (on its parameters, before params.yaml is
written) and the sweep (on every point, before any runs).

Checked: params.yaml parses (``params.yaml:LINE:COL: problem``) and validates (every section's
schema, the noise fractions leave clean samples); the recipe exists, parses and validates, with its
overrides; every column and embedding a recipe step reads is in the pool's schema or one the embed
stage makes (the demo pool's known columns; an external DataComp pool's metadata schema, read from
one parquet footer); ``train.scale`` is a preset of configs/scales.yaml; ``eval.suite`` is a
registry in configs/tasks; an external pool (``pool.source: datacomp``) exists, locally or on S3.

    check(params) -> ["problem", ...]          # a dict as params.yaml holds it (or a Params)
    run("params.yaml", {"filter.recipe": "basic"})   # -> Params; raises ParamsError listing them
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Iterator

from pydantic import ValidationError

from winnow.config import Params, ParamsError, load_scale, problems, safe_load
from winnow.errors import WinnowError

VERDICT = "data/check/verdict.json"


def load(path: str | Path = "params.yaml", updates: dict | None = None) -> tuple[dict | None, list[str]]:
    """params.yaml as a dict with the dotted ``updates`` set (as ``set_params`` would set them), or
    None and the problem (a syntax error, an update of a key the file lacks)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        return None, [f"{path}: cannot read: {exc.strerror or exc}"]
    try:
        data = safe_load(text, path) or {}
    except ParamsError as exc:
        return None, [str(exc)]
    if not isinstance(data, dict):
        return None, [f"{path}: expected a mapping of sections, got {type(data).__name__}"]
    data = copy.deepcopy(data)
    bad = []
    for dotted, value in (updates or {}).items():
        node, keys = data, dotted.split(".")
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or keys[-1] not in node:
            bad.append(f"cannot set '{dotted}': key '{keys[-1]}' not found in {path}")
            continue
        node[keys[-1]] = value
    return (None if bad else data), bad


def _demo_schema() -> tuple[set[str], set[str]]:
    """The demo pool's metadata columns and embedding keys (winnow.demo.pool writes exactly these)."""
    from winnow.pool.shards import EMBED_DIMS, META_SCHEMA

    return set(META_SCHEMA.names), set(EMBED_DIMS)


def _npz_keys(p) -> set[str] | None:
    """The arrays of a shard's .npz (a local one's zip directory only; none when there is no npz);
    None when unknown: a remote npz is not downloaded for this, the plan stage reads it."""
    import zipfile

    from winnow import io as wio

    if not wio.exists(p):
        return set()
    if wio.is_remote(p):
        return None
    try:
        with zipfile.ZipFile(wio.local(p)) as z:
            return {n[: -len(".npy")] for n in z.namelist() if n.endswith(".npy")}
    except (OSError, zipfile.BadZipFile):
        return None


def external_schema(pool) -> tuple[set[str], set[str] | None]:
    """An external pool's metadata columns (one parquet footer) and embedding keys (None when they
    cannot be read cheaply); raises ShardError / S3Error / OSError when the pool is not there."""
    import pyarrow.parquet as pq

    from winnow import io as wio
    from winnow.pool import datacomp, shards

    if pool.metadata_uri or pool.shards_uri or datacomp.is_download_dir(pool.uri):
        meta_uri, images_uri = datacomp.locate(pool.uri, pool.metadata_uri, pool.shards_uri)
        stem = datacomp.metadata_files(meta_uri)[0]
        if pool.shards_uri and not _listable(pool.shards_uri):
            raise shards.ShardError(f"pool.shards_uri {pool.shards_uri} not found")
        first, derived = wio.join(meta_uri, f"{stem}.parquet"), {"downloaded"}
        npz = wio.join(meta_uri, f"{stem}.npz")
    else:
        stem = shards.discover(pool.uri)[0]
        first, derived, npz = shards.path(pool.uri, stem, "parquet"), set(), shards.path(pool.uri, stem, "npz")
    try:
        cols = set(pq.read_schema(wio.source(first)).names) | derived
    except FileNotFoundError:
        raise shards.ShardError(f"metadata {first} is missing") from None
    except Exception as exc:   # not parquet (ArrowInvalid …)
        raise shards.ShardError(f"cannot read the schema of {first}: {exc}") from None
    return cols, _npz_keys(npz)


def _listable(uri: str) -> bool:
    from winnow import io as wio

    try:
        wio.list_names(uri)
        return True
    except FileNotFoundError:
        return False


def recipe_inputs(recipe, columns: set[str], keys: set[str] | None, name: str) -> list[str]:
    """Each input a recipe step reads that neither the pool has nor the embed stage makes (the plan
    stage's rule, winnow.plan.needs); embedding keys are not judged when ``keys`` is None."""
    from winnow.plan import PRODUCTS

    products = {f"{name}_{suffix}" for suffix in PRODUCTS}
    out = []
    for lab, step in zip(recipe.labels(), recipe.steps):
        cols, emb = step.requires()
        for x in cols:
            if x not in columns and x not in products:
                out.append(f"recipe '{recipe.name}' step '{lab}' needs column '{x}': the pool lacks it "
                           f"(pool columns: {', '.join(sorted(columns))}) and the embed stage makes only "
                           f"{', '.join(sorted(products))}")
        for x in emb:
            if keys is not None and x not in keys and x not in products:
                out.append(f"recipe '{recipe.name}' step '{lab}' needs embedding '{x}': the pool lacks it "
                           f"(pool embeddings: {', '.join(sorted(keys)) or 'none'}) and the embed stage makes only "
                           f"{', '.join(sorted(products))}")
    return out


def _lines(exc: Exception) -> list[str]:
    """A ParamsError's problems, one per line (validate_model's header line dropped)."""
    text = str(exc).strip().splitlines()
    if len(text) > 1 and text[0].endswith("is invalid:"):
        src = text[0][: -len(" is invalid:")]
        return [f"{src}: {line.strip()}" for line in text[1:]]
    if len(text) > 1 and text[0].endswith(":"):
        return [f"{text[0][:-1]}: {line.strip()}" for line in text[1:]]
    return [" ".join(line.strip() for line in text)]


def check(params: dict | Params, source: str = "params.yaml") -> list[str]:
    """Every problem found in these params (as params.yaml holds them), one line each; [] when they
    can run. Reads configs/ and, for ``pool.source: datacomp``, the pool's listing and one footer."""
    if isinstance(params, Params):
        p = params
    else:
        try:
            p = Params.model_validate(params or {})
        except ValidationError as exc:
            return [f"{source}: {line}" for line in problems(exc, Params)]
    found: list[str] = []

    def attempt(fn, *args):
        try:
            return fn(*args)
        except (WinnowError, ValueError, OSError) as exc:
            found.extend(_lines(exc))
            return None

    # the recipe: exists, parses, validates (and is one DVC tracks), its overrides name its steps
    from winnow.filters.engine import params_recipe

    recipe = attempt(params_recipe, p.filter)
    scale = attempt(load_scale, p.train.scale)
    from winnow.models import check_known

    attempt(check_known, p.scorer.model)
    if scale is not None:
        attempt(check_known, scale["model"], f"train.scale {p.train.scale}'s model")
    attempt(_suite, p.eval.suite)
    if p.pool.source == "demo":
        columns, keys = _demo_schema()
        attempt(_demo_noise, p)
    else:
        if p.storage.endpoint_url:
            from winnow import s3

            s3.use_endpoint(p.storage.endpoint_url)
        try:   # not found / unreadable schema is a problem; an outage is not (it propagates: exit 1)
            columns, keys = _external(p.pool)
        except ParamsError as exc:
            found.extend(_lines(exc))
            columns, keys = None, None
    if recipe is not None and columns is not None:
        from winnow.models import embedding_name

        name = attempt(embedding_name, p.scorer.model, p.scorer.pretrained, p.scorer.name)
        if name is not None:
            found.extend(recipe_inputs(recipe, columns, keys, name))
    return found


def _suite(name: str):
    from winnow.tasks import load_suite

    return load_suite(name)


def _demo_noise(p: Params) -> None:
    """The demo pool's own rule: rounded per-kind counts must leave at least one clean sample."""
    n = p.pool.num_samples
    noisy = sum(int(round(v * n)) for v in p.pool.noise.model_dump().values())
    if n - noisy < 1:
        raise ParamsError(f"params.yaml: 'pool.noise': the fractions leave no clean sample of pool.num_samples {n}")


def _external(pool) -> tuple[set[str], set[str] | None]:
    from winnow.pool.shards import ShardError
    from winnow.s3 import S3NotFound
    from winnow.track import scrub

    where = f"params.yaml: pool.source datacomp, pool.uri {scrub(pool.uri)}"   # a URI may carry credentials
    try:
        return external_schema(pool)
    except ShardError as exc:
        raise ParamsError(f"{where}: {scrub(exc)}") from None
    except (FileNotFoundError, S3NotFound) as exc:
        raise ParamsError(f"{where}: not found ({scrub(exc)})") from None
    # anything else (S3 unreachable or throttled, a flaky filesystem) is not a config error: it leaves
    # with its own exit status (1), so Prefect retries it


INPUTS = "data/check/inputs"   # <consumer>.json: what the stage reads from outside DVC's view


def external_inputs(p: Params, dvc_yaml: str | Path = "dvc.yaml") -> dict[str, dict]:
    """Per consuming stage, the identity (jobs.content_identity: bytes of small files, size and
    mtime of large ones, S3 ETags) of every input params.yaml names that no stage produces and
    dvc.yaml cannot list: an external pool (``pool``), the files a recipe's steps and targets read
    (``filter``), a local or S3 scorer checkpoint (``scorer``), an external evaluation root
    (``eval``). The check stage, which runs on every ``dvc repro``, writes them, and each consumer
    depends on its own: an edited word list or a re-downloaded pool re-runs what reads it."""
    from winnow import dvcfile
    from winnow.filters.engine import params_recipe
    from winnow.io import is_remote
    from winnow.jobs import content_identity
    from winnow.tasks import loading_noise

    produced = [Path(o).resolve() for spec in dvcfile.stages(dvc_yaml).values() for o in dvcfile.declared_outputs(spec)]

    def outside(uri: str) -> bool:   # not a pipeline output (those are DVC's already)
        if is_remote(uri):
            return True
        path = Path(uri).resolve()
        return not any(path == o or o in path.parents for o in produced)

    def identities(uris, ignore=None) -> dict:
        return {u: content_identity(u, ignore) for u in sorted({str(u) for u in uris if u}) if outside(u)}

    pool = [] if p.pool.source == "demo" else [p.pool.uri, p.pool.metadata_uri, p.pool.shards_uri]
    files = params_recipe(p.filter).input_files()
    weights = p.scorer.pretrained
    local_or_s3 = weights and (is_remote(weights) or Path(weights).exists())
    return {"pool": identities(pool), "filter": identities(files),
            "scorer": identities([weights] if local_or_s3 else []),
            "eval": identities([p.eval.data_root], ignore=loading_noise)}


def run(path: str | Path = "params.yaml", updates: dict | None = None) -> Params:
    """The validated params of ``path`` with ``updates`` applied (nothing is written); raises a
    ParamsError listing every problem."""
    data, found = load(path, updates)
    if data is not None:
        found = check(data, str(path))
    if found:
        what = f"{path} with {updates}" if updates else str(path)
        raise ParamsError(f"{what} cannot run ({len(found)} problem{'s' * (len(found) > 1)}):\n  " + "\n  ".join(found))
    return Params.model_validate(data)


# --- what runs the pipeline with new params: one run per workspace, params.yaml put back on failure

@contextlib.contextmanager
def restore_on_failure(path: str | Path = "params.yaml") -> Iterator[None]:
    """On any failure inside (an exception, an interrupt), put ``path`` back byte for byte,
    atomically: a failed run never leaves its params for the next run to fail on."""
    from winnow.io import atomic_file

    path = Path(path)
    saved = path.read_bytes()
    try:
        yield
    except BaseException:
        if not path.exists() or path.read_bytes() != saved:
            with atomic_file(path) as tmp:
                Path(tmp).write_bytes(saved)
        raise
