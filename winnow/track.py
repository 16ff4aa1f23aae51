"""MLflow tracking: one parent run per pipeline run, one child run per stage.

The parent's id travels to stage processes in ``WINNOW_PARENT_RUN_ID`` (set by ``winnow run`` and
the Prefect flow). A stage run without it (plain ``dvc repro``) is a top-level run tagged with its
stage. Params are flattened from params.yaml with secret-looking values masked.
"""
from __future__ import annotations

import contextlib
import os
import re

PARENT_ENV = "WINNOW_PARENT_RUN_ID"
_SECRET = re.compile(r"(secret|password|passwd|token|credential|access_key|api_key|private)", re.I)


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


def _setup(params) -> None:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params.tracking.uri))
    mlflow.set_experiment(params.tracking.experiment)


@contextlib.contextmanager
def pipeline_run(params, name: str = "pipeline"):
    """The parent run; exports its id so stage subprocesses nest under it."""
    import mlflow

    _setup(params)
    with mlflow.start_run(run_name=name, tags={"winnow.kind": "pipeline"}) as run:
        mlflow.log_params({k: _param(v) for k, v in flatten(params.model_dump()).items()})
        old = os.environ.get(PARENT_ENV)
        os.environ[PARENT_ENV] = run.info.run_id
        try:
            yield run
        finally:
            if old is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = old


@contextlib.contextmanager
def stage_run(stage: str, params, sections: list[str]):
    import mlflow

    _setup(params)
    parent = os.environ.get(PARENT_ENV) or None
    with mlflow.start_run(run_name=stage, parent_run_id=parent,
                          tags={"winnow.stage": stage, "winnow.kind": "stage"}) as run:
        flat = flatten(params.model_dump())
        mine = {k: _param(v) for k, v in flat.items() if any(k == s or k.startswith(f"{s}.") for s in sections)}
        mlflow.log_params(mine)
        yield run


def log_metrics(metrics: dict, step: int | None = None) -> None:
    import math

    import mlflow

    flat = {k.replace("@", "_at_").replace(":", "_"): float(v) for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    if flat:
        mlflow.log_metrics(flat, step=step)


def log_curve(curve: list[dict], keys=("loss", "lr", "samples_per_s"), prefix: str = "train") -> None:
    """Per-step training records, stepped by samples seen, in batches."""
    import time

    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(f"{prefix}.{k}", float(r[k]), now, int(r["samples"])) for r in curve for k in keys if k in r]
    client = mlflow.tracking.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i: i + 1000])


def log_artifact(path: str) -> None:
    import mlflow

    if os.path.exists(path):
        mlflow.log_artifact(path)


def log_table(df, artifact_file: str) -> None:
    """A table artifact of the active run (MLflow's table view)."""
    import mlflow

    mlflow.log_table(df, artifact_file=artifact_file)
