"""MLflow tracking: one parent run per pipeline execution, one child run per stage.

An execution is a ``winnow run``, a Prefect flow run, a bare ``dvc repro`` or one ``dvc exp run``
point. The first two make the parent themselves and pass its id to the stage processes in
``WINNOW_PARENT_RUN_ID``; under plain DVC the first stage makes it, tagged with the ``dvc`` process
it runs under, and the later stages find it by that tag. The parent carries what tells executions
apart (recipe, scale, pool source, git commit, DVC experiment name) and, from the report stage,
the headline metrics and the report; each stage's child carries its params section and metrics.
Params are flattened from params.yaml with secret-looking values masked.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path

from winnow.errors import WinnowError

PARENT_ENV = "WINNOW_PARENT_RUN_ID"
_SECRET = re.compile(r"(secret|password|passwd|token|credential|access_key|api_key|private)", re.I)


class TrackingError(WinnowError):
    """The MLflow tracking store cannot be reached, or refuses the first request."""


def tracking_uri(default: str) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = "***" if _SECRET.search(key) and v else v
    return out


_SECRET_FIELD = re.compile(r"(^sig$|signature$|credential|token|secret|password|passwd|^pwd$|passphrase|^auth|"
                           r"authorization|session|private|access.?key|api.?key|key.?id$|^key$|^code$)", re.I)
_HOST_PORT = re.compile(r"^(localhost|[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+|\[[0-9A-Fa-f:.]+\]):\d+$")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://\S*")
_TRAILING = "'\"`)]}>,;.!"
MASK = "***"


def scrub(text) -> str:
    """``text`` with the credentials of every URL in it masked. URLs sit inside free text (error
    messages, params), so each URL-like token (``scheme://`` up to whitespace) is parsed with
    urllib.parse and rebuilt: its userinfo (``user:pass@``, ``TOKEN@``, passwords containing ``/``
    or ``@``) becomes ``***@`` and query or fragment fields that carry secrets (presigned
    ``X-Amz-Signature``/``X-Amz-Credential``/``X-Amz-Security-Token``, ``Signature``,
    ``AWSAccessKeyId``, SAS ``sig``, ``token``, ``password`` …) get ``***`` values. Query strings
    outside a URL (``?X-Amz-Signature=…``, ``Signature=…&…``) are masked the same way."""
    text = str(text)
    out, pos = [], 0
    for m in _URL.finditer(text):
        out.append(_scrub_plain(text[pos: m.start()]))
        tok = m.group(0)
        tail = len(tok) - len(tok.rstrip(_TRAILING))
        core, end = (tok[:-tail], tok[-tail:]) if tail else (tok, "")
        out.append(_scrub_url(core) + _scrub_plain(end))
        pos = m.end()
    out.append(_scrub_plain(text[pos:]))
    return "".join(out)


def _scrub_url(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    scheme, _, rest = url.partition("://")
    # the authority ends at the first / ? # after the userinfo; a password may hold / or @
    # unencoded, so the userinfo runs to the last @ before the host (never past ? or #)
    head = re.split(r"[?#]", rest, maxsplit=1)[0]
    if "@" in head:
        at = head.rindex("@")
        userinfo = head[:at]
        first = userinfo.split("/", 1)[0]
        path_at = "/" in userinfo and (bool(_HOST_PORT.match(first)) or (
            ":" not in first and ("." in first or scheme.lower() in ("s3", "gs", "file"))))
        if not path_at:            # user:pass@, TOKEN@, user:pa/ss@, user:p@ss@ — not an @ inside the path
            rest = MASK + rest[at:]
    try:
        parts = urlsplit(f"{scheme}://{rest}")
    except ValueError:             # unparseable (e.g. a bad IPv6 literal): mask everything after the scheme
        return f"{scheme}://{MASK}"
    query, fragment = _scrub_query(parts.query), _scrub_query(parts.fragment)
    if query == parts.query and fragment == parts.fragment:
        return f"{scheme}://{rest}"
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, fragment))


def _scrub_query(q: str) -> str:
    """A query string (``a=1&b=2``, ``;`` separators too) with secret-carrying fields masked."""
    if "=" not in q:
        return q
    fields = re.split(r"([&;])", q)
    for i in range(0, len(fields), 2):
        name, eq, value = fields[i].partition("=")
        if eq and value and _SECRET_FIELD.search(_unquote(name)):
            fields[i] = f"{name}={MASK}"
    return "".join(fields)


def _unquote(s: str) -> str:
    from urllib.parse import unquote_plus

    return unquote_plus(s)


def _scrub_plain(text: str) -> str:
    """Text without URLs: mask the values of secret-named ``name=value`` fields of any query-like
    token (``?X-Amz-Signature=…``, ``Signature=…``, ``aws_secret_access_key=…``)."""
    if "=" not in text:
        return text
    pieces = re.split(r"(\s+)", text)
    for i in range(0, len(pieces), 2):
        tok = pieces[i]
        if "=" not in tok:
            continue
        lead, q = "", tok
        if "?" in tok:
            lead, _, q = tok.partition("?")
            lead += "?"
        pieces[i] = lead + _scrub_query(q)
    return "".join(pieces)


def _param(v) -> str:
    """A param value as MLflow stores it: credentials scrubbed, at most its 6,000 characters (an
    inline recipe's step list can be longer)."""
    v = scrub(v)
    return v if len(v) <= 6000 else v[:5990] + " …(cut)"


def _setup(params) -> str:
    """Point MLflow at the project's store and experiment; returns the experiment id."""
    import mlflow

    _quiet()
    uri = tracking_uri(params.tracking.uri)
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    # MLflow also exports the URI to the environment: in a process that runs several projects (a
    # Prefect worker, a test session) one project's store would become the next one's stages' store
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    if (db := _local_sqlite(uri)) and db.parent == Path.cwd().resolve():   # the project's own store
        relocate_artifacts(db)
    # not mlflow.set_experiment: it exports MLFLOW_EXPERIMENT_ID, which every child process (another
    # project's stages, a test's subprocess) would then take for its own store's experiment
    from mlflow.exceptions import MlflowException

    client = mlflow.tracking.MlflowClient()
    try:
        exp = client.get_experiment_by_name(params.tracking.experiment)
    except Exception as exc:   # unreachable, refused, or not an MLflow store: the first request tells
        raise TrackingError(f"MLflow tracking store {scrub(uri)} failed: {type(exc).__name__}: {scrub(exc)}") from None
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(params.tracking.experiment)
    except MlflowException:   # made meanwhile by another stage
        return client.get_experiment_by_name(params.tracking.experiment).experiment_id


def _quiet() -> None:
    """MLflow announces creating a store's tables and an experiment at INFO: expected on a first
    run, noise in every stage's output."""
    import logging

    for name in ("mlflow.store.db.utils", "mlflow.tracking.fluent", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _local_sqlite(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")).resolve() if uri.startswith("sqlite:///") else None


def relocate_artifacts(db: Path) -> int:
    """Keep a sqlite store's artifacts under the project that holds the store. MLflow records each
    experiment's and run's artifact location as an absolute path, so a copied project (a clone of a
    workspace, a DVC temp dir, a test's copy) would write its artifacts into the original; there
    is no API to move them, so the recorded ``<old project>/mlruns`` prefix is rewritten to this
    project's ``mlruns`` (which the copy brought along). Returns the rows rewritten."""
    import sqlite3

    if not db.exists():
        return 0
    here = str(db.parent / "mlruns")
    con = sqlite3.connect(db, timeout=30)
    try:
        with con:
            try:
                rows = con.execute("SELECT DISTINCT artifact_location FROM experiments").fetchall()
            except sqlite3.OperationalError:   # a new store: MLflow has not made its tables yet
                return 0
            n = 0
            for (loc,) in rows:
                path = (loc or "").removeprefix("file://")
                parts = Path(path).parts
                if not path.startswith("/") or "mlruns" not in parts:
                    continue                      # remote, or not the default layout: left alone
                old = str(Path(*parts[: len(parts) - parts[::-1].index("mlruns")]))
                if old == here:
                    continue
                for table, col in (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                                   ("logged_models", "artifact_location")):
                    for a, b in ((old, here), (f"file://{old}", f"file://{here}")):
                        try:   # the prefix, as a whole path component
                            n += con.execute(f"UPDATE {table} SET {col} = ? || substr({col}, ?) "
                                             f"WHERE {col} = ? OR substr({col}, 1, ?) = ?",
                                             (b, len(a) + 1, a, len(a) + 1, a + "/")).rowcount
                        except sqlite3.OperationalError:   # a table this MLflow version lacks
                            break
            return n
    finally:
        con.close()


# --- the pipeline execution (one MLflow parent run) ------------------------------------------------

EXECUTION_TAG = "winnow.execution"   # which process tree a parent run belongs to
OWNED_TAG = "winnow.parent"          # "stages": the stages created it and close it; "caller": winnow run / Prefect


def _is_dvc(cmdline: list[str]) -> bool:
    """``dvc …``, ``python …/bin/dvc …`` or ``python -m dvc …``."""
    head = cmdline[:3]
    return any(os.path.basename(a) == "dvc" for a in head) or "-m dvc" in " ".join(head)


def execution_key() -> str:
    """The ``dvc`` process (repro, exp run) this stage runs under, as pid and start time: every stage
    of one ``dvc repro`` / ``dvc exp run`` shares it, and no other execution does. Without a dvc
    ancestor (a stage run by hand) the stage is an execution of its own."""
    import psutil

    me = psutil.Process()
    for proc in me.parents():
        try:
            if _is_dvc(proc.cmdline()):
                return f"dvc:{proc.pid}:{_started(proc)}"
        except psutil.Error:
            continue
    return f"process:{me.pid}:{_started(me)}"


def _started(proc) -> str:
    """When ``proc`` started, the same in every process that asks: on Linux the kernel's start time
    in clock ticks since boot (psutil's ``create_time`` adds the boot time, which it re-reads and which
    can move by a second between processes, and one execution would get two keys)."""
    try:
        with open(f"/proc/{proc.pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return f"{proc.create_time():.3f}"


def git_commit() -> str | None:
    """The commit the pipeline runs on (DVC's baseline in an experiment), ``+dirty`` when the
    working tree has tracked changes (params.yaml edited by hand, say)."""
    import subprocess

    rev = os.environ.get("DVC_EXP_BASELINE_REV")
    try:
        if not rev:
            rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
            dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".", ":!dvc.lock"], capture_output=True).returncode
            rev += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev or None


COMPARABLE_TAG = "winnow.comparable"


def comparable(params) -> str:
    """What two runs must share for one to be the other's baseline: the pool (and the seed that
    generates a demo pool), the evaluation, and the training but its seed. Not the recipe, nor the
    scorer (no_filter reads none)."""
    from winnow.jobs import digest

    pool = params.pool.model_dump(mode="json", exclude={"min_downloaded", "max_unreadable_tars"})
    for knob in ("loose_captions", "text_on_objects"):   # off, the pool is byte-identical to one from before the knob: same tag
        if not pool[knob]:
            del pool[knob]
    return digest({"pool": pool,
                   "seed": params.seed,      # gates' floors (above) and how evaluation runs (below) change no score
                   "eval": params.eval.model_dump(mode="json", exclude={"workers", "device", "batch_size",
                                                                        "max_quarantined", "allow_partial"}),
                   "train": params.train.model_dump(mode="json", exclude={"seed"})}, 16)


def describe(params) -> tuple[dict, dict]:
    """The params and tags of a pipeline parent run: what tells one execution from another in
    MLflow's compare view (the whole params.yaml is in each stage's child run)."""
    import json

    recipe = params.filter.recipe if isinstance(params.filter.recipe, str) else params.filter.recipe.get("name", "inline")
    p = {"recipe": recipe, "scale": params.train.scale, "pool.source": params.pool.source,
         "pool.uri": params.pool.uri, "seed": params.seed, "train.seed": params.train.seed,
         "eval.suite": params.eval.suite}
    if params.filter.overrides:
        p["filter.overrides"] = json.dumps(params.filter.overrides, sort_keys=True)
    exp = os.environ.get("DVC_EXP_NAME")
    tags = {"winnow.kind": "pipeline", "winnow.recipe": recipe, "winnow.scale": params.train.scale,
            "winnow.pool_source": params.pool.source, COMPARABLE_TAG: comparable(params)}
    if commit := git_commit():
        tags["winnow.git_commit"] = tags["mlflow.source.git.commit"] = commit
    if exp:
        tags["winnow.dvc_experiment"] = exp
        p["dvc.experiment"] = exp
    return {k: _param(v) for k, v in p.items()}, tags


def _start_parent(params, name: str, tags: dict) -> str:
    import mlflow
    from mlflow.entities import Param

    exp_id = _setup(params)
    values, base = describe(params)
    name = os.environ.get("DVC_EXP_NAME") or name
    client = mlflow.tracking.MlflowClient()
    run = client.create_run(exp_id, run_name=name, tags=base | tags)
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in values.items()])
    return run.info.run_id


@contextlib.contextmanager
def pipeline_run(params, name: str = "pipeline"):
    """The parent run of a caller that runs the stages (``winnow run``, the Prefect flow); its id
    goes to the stage processes in ``WINNOW_PARENT_RUN_ID``. Failed when the body raises."""
    import mlflow

    run_id = _start_parent(params, name, {OWNED_TAG: "caller"})
    old = os.environ.get(PARENT_ENV)
    os.environ[PARENT_ENV] = run_id
    client = mlflow.tracking.MlflowClient()
    status = "FAILED"
    try:
        yield client.get_run(run_id)
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
        if old is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = old


def current_parent(params, exp_id: str | None = None) -> tuple[str, bool]:
    """(parent run id, whether the stages own it). From ``WINNOW_PARENT_RUN_ID`` when a caller made
    one; else the parent of this ``dvc repro`` / ``dvc exp run`` (found by its execution tag, made
    by the first stage that runs)."""
    import mlflow

    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV], False
    exp_id = exp_id or _setup(params)
    key = execution_key()
    client = mlflow.tracking.MlflowClient()
    found = client.search_runs([exp_id], filter_string=f"tags.`{EXECUTION_TAG}` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id, True
    name = "dvc-exp-run" if os.environ.get("DVC_EXP_NAME") else ("dvc-repro" if key.startswith("dvc:") else "stage")
    return _start_parent(params, name, {OWNED_TAG: "stages", EXECUTION_TAG: key}), True


@contextlib.contextmanager
def stage_run(stage: str, params, sections: list[str]):
    """A stage's child run under the execution's parent. A parent the stages own is RUNNING while a
    stage runs, FINISHED between stages and after the last, FAILED when a stage fails."""
    import mlflow

    exp_id = _setup(params)
    parent, owned = current_parent(params, exp_id)
    client = mlflow.tracking.MlflowClient()
    if owned:
        client.update_run(parent, status="RUNNING")
    ok = False
    try:
        with mlflow.start_run(run_name=stage, parent_run_id=parent, experiment_id=exp_id,
                              tags={"winnow.stage": stage, "winnow.kind": "stage"}) as run:
            mlflow.log_params(section_params(params, sections))
            yield run
        ok = True
    finally:
        if owned:
            client.set_terminated(parent, "FINISHED" if ok else "FAILED")


def section_params(params, sections: list[str]) -> dict:
    flat = flatten(params.model_dump())
    return {mlflow_key(k): _param(v) for k, v in flat.items() if any(k == s or k.startswith(f"{s}.") for s in sections)}


_KEY_BAD = re.compile(r"[^\w\-./ ]")


def mlflow_key(key: str) -> str:
    """A metric or param name MLflow accepts (a step label like ``language#2``, ``recall@5``)."""
    return _KEY_BAD.sub("_", key.replace("@", "_at_"))


def _numeric(metrics: dict) -> dict:
    import math

    return {mlflow_key(k): float(v) for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def log_cached_stages(parent: str, params, stages: dict[str, list[str]], metrics_of) -> list[str]:
    """A child run, tagged ``winnow.cached``, for each stage of ``stages`` ({name: params sections})
    that has none under ``parent``: DVC skipped it or restored its outputs from the run-cache, so
    its metrics are those of the outputs on disk (``metrics_of(stage)``). Returns the stages logged."""
    import time

    import mlflow
    from mlflow.entities import Metric, Param

    client = mlflow.tracking.MlflowClient()
    exp_id = client.get_run(parent).info.experiment_id
    have = {r.data.tags.get("winnow.stage") for r in
            client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1000)}
    logged = []
    for stage, sections in stages.items():
        if stage in have:
            continue
        run = client.create_run(exp_id, run_name=stage, tags={
            "winnow.stage": stage, "winnow.kind": "stage", "winnow.cached": "true", "mlflow.parentRunId": parent})
        now = int(time.time() * 1000)
        client.log_batch(run.info.run_id,
                         metrics=[Metric(k, v, now, 0) for k, v in _numeric(metrics_of(stage)).items()],
                         params=[Param(k, v) for k, v in section_params(params, sections).items()])
        client.set_terminated(run.info.run_id, "FINISHED")
        logged.append(stage)
    return logged


def finish_parent(parent: str, metrics: dict, tags: dict, artifacts: list[str]) -> None:
    """The execution's headline: metrics, tags (the model's identity) and the report on the parent."""
    import time

    import mlflow
    from mlflow.entities import Metric, RunTag

    client = mlflow.tracking.MlflowClient()
    now = int(time.time() * 1000)
    client.log_batch(parent, metrics=[Metric(k, v, now, 0) for k, v in _numeric(metrics).items()],
                     tags=[RunTag(k, str(v)) for k, v in tags.items()])
    for path in artifacts:
        if os.path.exists(path):
            client.log_artifact(parent, path, artifact_path="report")


def _active_run():
    """The stage's MLflow run, or None: a stage body called outside ``stage_run`` (a benchmark, a test
    in-process) logs nothing, rather than letting MLflow start a stray run (and pay its import)."""
    mlflow = sys.modules.get("mlflow")     # not imported: no run can be active
    return mlflow.active_run() if mlflow else None


def log_metrics(metrics: dict, step: int | None = None) -> None:
    if _active_run() is None:
        return
    import mlflow

    flat = _numeric(metrics)
    if flat:
        mlflow.log_metrics(flat, step=step)


def log_curve(curve: list[dict], keys=("loss", "lr", "samples_per_s"), prefix: str = "train") -> None:
    """Per-step training records, stepped by samples seen, in batches."""
    import time

    if _active_run() is None:
        return
    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(f"{prefix}.{k}", float(r[k]), now, int(r["samples"])) for r in curve for k in keys if k in r]
    client = mlflow.tracking.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i: i + 1000])


def log_artifact(path: str) -> None:
    if _active_run() is None:
        return
    import mlflow

    if os.path.exists(path):
        mlflow.log_artifact(path)


def log_table(df, artifact_file: str) -> None:
    """A table artifact of the active run (MLflow's table view)."""
    if _active_run() is None:
        return
    import mlflow

    mlflow.log_table(df, artifact_file=artifact_file)
