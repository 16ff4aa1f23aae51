"""Stage outputs published to object storage (``storage.uri: s3://bucket/prefix``).

DVC keeps running on the local workspace (its cache, lock and an S3 *remote* for ``dvc push``);
with ``storage.uri`` set, each stage also publishes the outputs dvc.yaml declares for it to
``<storage.uri>/<output path>`` once its gate has passed. The commit protocol keeps a reader from
ever seeing a half-published output: every file goes to a temporary prefix first, is copied onto
its final key, and the output's ``_SUCCESS.json`` manifest (file names, sizes, sha256) is written
last; keys of an earlier version that the new one lacks are removed before the manifest lands.
A reader trusts an output prefix only when its manifest is there.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import yaml

from winnow.io import file_sha256

MANIFEST = "_SUCCESS.json"


def stage_outputs(stage: str, dvc_yaml: str | Path = "dvc.yaml") -> list[str]:
    """The paths a stage declares as outs, metrics and plots."""
    spec = yaml.safe_load(Path(dvc_yaml).read_text(encoding="utf-8"))["stages"][stage]
    return declared_outputs(spec)


def declared_outputs(spec: dict) -> list[str]:
    paths = []
    for kind in ("outs", "metrics", "plots"):
        for o in spec.get(kind, []) or []:
            paths.append(next(iter(o)) if isinstance(o, dict) else o)
    return paths


def _files(path: Path) -> list[tuple[str, Path]]:
    """(relative name, file) pairs of a directory tree."""
    return sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())


def publish_output(local_path: str | Path, uri: str) -> dict:
    """Publish one output to ``uri``: a file as one object, a directory with the commit protocol above."""
    from winnow import s3

    local_path = Path(local_path)
    if local_path.is_file():     # one object: a temporary key copied into place is atomic already
        s3.upload(local_path, uri)
        return {"uri": uri, "files": 1}
    files = _files(local_path)
    bucket, key = s3.split(uri)
    key = key.rstrip("/")
    tmp_prefix = f"{key}.{uuid.uuid4().hex}.tmp"
    c = s3.client()
    manifest = {"files": {name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for name, p in files}}
    try:
        for name, p in files:                                  # 1. everything to a temporary prefix
            s3.upload_raw(p, f"s3://{bucket}/{tmp_prefix}/{name}")
        c.delete_object(Bucket=bucket, Key=f"{key}/{MANIFEST}")   # 2. the old version is no longer complete
        for name, _ in files:                                  # 3. copied onto the final keys
            c.copy({"Bucket": bucket, "Key": f"{tmp_prefix}/{name}"}, bucket, f"{key}/{name}")
        stale = {f"{key}/{k}" for k in s3.list_keys(f"s3://{bucket}/{key}")} - {f"{key}/{n}" for n, _ in files}
        for k in sorted(stale):                                # 4. what the new version lacks
            c.delete_object(Bucket=bucket, Key=k)
        c.put_object(Bucket=bucket, Key=f"{key}/{MANIFEST}", Body=json.dumps(manifest, indent=1).encode())   # 5. commit
    finally:
        for k in s3.list_keys(f"s3://{bucket}/{tmp_prefix}"):
            c.delete_object(Bucket=bucket, Key=f"{tmp_prefix}/{k}")
    return {"uri": f"s3://{bucket}/{key}", "files": len(files)}


def is_complete(uri: str) -> bool:
    """A published directory has its manifest; a published file exists."""
    from winnow import s3

    return s3.exists(f"{uri.rstrip('/')}/{MANIFEST}") or s3.exists(uri)


def publish_stage(stage: str, storage_uri: str, dvc_yaml: str | Path = "dvc.yaml") -> list[dict]:
    """Publish every output of ``stage`` under ``storage_uri`` (same relative paths)."""
    out = []
    for rel in stage_outputs(stage, dvc_yaml):
        if Path(rel).exists():
            out.append(publish_output(rel, f"{storage_uri.rstrip('/')}/{rel}"))
    return out
