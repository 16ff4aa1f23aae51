"""Stage outputs published to object storage (``storage.uri: s3://bucket/prefix``).

DVC keeps running on the local workspace (its cache, lock and an S3 *remote* for ``dvc push``);
with ``storage.uri`` set, each stage also publishes the outputs dvc.yaml declares for it to
``<storage.uri>/<output path>`` once its gate has passed.

A directory output is published as an immutable version, and a pointer names the current one::

    <out>/_v/<version>/_MANIFEST.json   what the version holds (names, sizes, sha256), written first
    <out>/_v/<version>/<name> ...       the files; never overwritten
    <out>/_SUCCESS.json                 the pointer: the current version's manifest, written last

Nothing a reader can see changes until the pointer is written, in one PUT, conditional on the
pointer it replaces (``If-Match`` its ETag; ``If-None-Match: *`` for the first): two publishers
to one prefix write disjoint versions and the pointer always describes one version's bytes. Every
reader goes through the pointer and checks each file's sha256 (:func:`read_published`,
:func:`download_output`; ``io.cache_local`` uses it). Only what winnow's own manifests list is ever
deleted: the version before the previous one when a new one lands (a reader that resolved the
pointer just before keeps its version until the next publish), and versions whose publisher died
(their manifest older than a day and never pointed to). Keys under the prefix that no winnow
manifest lists are never touched; a pointer that is not winnow's is refused, as is a storage
prefix that overlaps an input (``pool.uri``, ``scorer.train.trusted_uri`` …): publishing must never
remove or shadow what a stage reads.

A file output is one object, uploaded to a temporary key and copied into place, carrying its
sha256 in its metadata (``x-amz-meta-winnow-sha256``); an existing object without that mark (not
written by winnow) is never overwritten.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from winnow.dvcfile import documents, outputs
from winnow.io import file_sha256
from winnow.s3 import S3Error

MANIFEST = "_SUCCESS.json"          # the pointer (the name readers and tools look for)
VERSIONS = "_v"
VERSION_MANIFEST = "_MANIFEST.json"
FORMAT = "winnow-publish/2"
SHA_META = "winnow-sha256"
ORPHAN_GRACE_S = 24 * 3600.0        # an unpointed version younger than this may be a publisher at work
POINTER_RETRIES = 8


class PublishError(S3Error):
    """Publishing was refused or could not complete; nothing a reader sees changed."""


class IntegrityError(PublishError):
    """A published file's bytes differ from its manifest's sha256 or size (or it is missing)."""


class OverlapError(PublishError):
    """The storage prefix overlaps a URI the pipeline reads."""


def stage_outputs(stage: str, dvc_yaml: str | Path = "dvc.yaml") -> list[str]:
    """The paths a stage declares as outs, metrics and plots, and the documents it writes."""
    return outputs(stage, dvc_yaml) + documents(stage, dvc_yaml)


def _files(path: Path) -> list[tuple[str, Path]]:
    """(relative name, file) pairs of a directory tree."""
    return sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())


# --- overlap with inputs ------------------------------------------------------------------------

def _norm(uri: str) -> tuple[str, str, tuple[str, ...]]:
    """(scheme, bucket or '', key segments) of an s3:// URI or a local path."""
    from winnow import s3

    if s3.is_s3(uri):
        bucket, key = s3.split(uri)
        return "s3", bucket, tuple(p for p in key.split("/") if p)
    return "file", "", tuple(Path(os.path.abspath(uri)).parts)


def overlaps(a: str, b: str) -> bool:
    """Whether one location contains the other (same bucket, one key prefix a prefix of the other
    at a ``/`` boundary; an empty key is the whole bucket)."""
    sa, ba, ka = _norm(a)
    sb, bb, kb = _norm(b)
    if sa != sb or ba != bb:
        return False
    n = min(len(ka), len(kb))
    return ka[:n] == kb[:n]


def input_uris(params: dict) -> list[str]:
    """Every ``s3://`` location params.yaml names outside ``storage`` and ``tracking``: what the
    pipeline reads (pool, trusted set, evaluation data, weights)."""
    out: list[str] = []

    def walk(v, top: str | None):
        if isinstance(v, dict):
            for k, x in v.items():
                if top is None and k in ("storage", "tracking"):
                    continue
                walk(x, k if top is None else top)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x, top)
        elif isinstance(v, str) and v.startswith("s3://"):
            out.append(v)

    walk(params or {}, None)
    return sorted(set(out))


def check_overlap(storage_uri: str, inputs: list[str]) -> None:
    """Refuse a storage prefix that contains, equals or lies inside an input location."""
    from winnow.track import scrub

    for inp in inputs:
        if overlaps(storage_uri, inp):
            raise OverlapError(
                f"storage.uri {scrub(storage_uri)} overlaps the input {scrub(inp)}: publishing there could replace or "
                "remove data the pipeline reads. Publish to a prefix of its own (e.g. s3://bucket/winnow-runs/<name>).")


def _params_inputs(dvc_yaml: str | Path) -> list[str]:
    p = Path(dvc_yaml).with_name("params.yaml")
    if not p.exists():
        return []
    from winnow.config import ParamsError, safe_load

    try:
        return input_uris(safe_load(p.read_text(encoding="utf-8"), p) or {})
    except ParamsError:
        return []


# --- the pointer --------------------------------------------------------------------------------

@dataclass
class Published:
    """A resolved pointer: the current version of a published directory."""
    uri: str                       # the output's prefix
    version: str
    prefix: str                    # the version's prefix, relative to ``uri`` ('' for a pre-version manifest)
    files: dict = field(default_factory=dict)     # name -> {"size", "sha256"}
    pointer: dict = field(default_factory=dict)

    def file_uri(self, name: str) -> str:
        return "/".join(x for x in (self.uri.rstrip("/"), self.prefix, name) if x)

    def read(self, name: str) -> bytes:
        """The bytes of ``name`` in this version, checked against the manifest (IntegrityError)."""
        from winnow import s3

        if name not in self.files:
            raise PublishError(f"{name!r} is not in the published version {self.version or '(first layout)'} of {self.uri}")
        try:
            data = s3.read_bytes(self.file_uri(name))
        except s3.S3NotFound:
            raise IntegrityError(f"{self.file_uri(name)} is missing (listed by {self.uri}/{MANIFEST}); it may have "
                                 "been replaced twice while being read: resolve and read again") from None
        meta = self.files[name]
        if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise IntegrityError(f"{self.file_uri(name)}: bytes differ from the manifest (sha256 {meta['sha256'][:12]}…)")
        return data


def _split(uri: str) -> tuple[str, str]:
    from winnow import s3

    bucket, key = s3.split(uri)
    return bucket, key.rstrip("/")


def _get_pointer(uri: str) -> tuple[dict | None, str | None]:
    """(pointer, its ETag) of a published directory, (None, None) when there is none."""
    from winnow import s3

    bucket, key = _split(uri)
    puri = f"s3://{bucket}/{key}/{MANIFEST}"
    try:
        obj = s3.call("cannot read", puri, s3.client().get_object, Bucket=bucket, Key=f"{key}/{MANIFEST}")
    except s3.S3NotFound:
        return None, None
    body = obj["Body"].read()
    try:
        pointer = json.loads(body)
    except ValueError:
        raise PublishError(f"{puri} is not winnow's manifest (not JSON); refusing to use or replace it") from None
    if not isinstance(pointer, dict) or not isinstance(pointer.get("files"), dict):
        raise PublishError(f"{puri} is not winnow's manifest (no 'files' mapping); refusing to use or replace it")
    return pointer, obj.get("ETag")


def _checked_files(files: dict, where: str) -> dict:
    from winnow.io import UnsafePath, check_relative

    out = {}
    for name, meta in files.items():
        try:
            check_relative(name, "manifest entry")
        except UnsafePath as exc:
            raise PublishError(f"{where}: {exc}") from None
        if not (isinstance(meta, dict) and isinstance(meta.get("size"), int)
                and re.fullmatch(r"[0-9a-f]{64}", str(meta.get("sha256", "")))):
            raise PublishError(f"{where}: entry {name!r} lacks a size and sha256")
        out[name] = meta
    return out


def resolve(uri: str) -> Published:
    """The current version of a published directory, from its pointer (checked: winnow's format,
    safe names, a size and sha256 per file). Raises PublishError when there is none."""
    uri = uri.rstrip("/")
    pointer, _ = _get_pointer(uri)
    if pointer is None:
        raise PublishError(f"{uri} has no {MANIFEST}: nothing complete is published there")
    files = _checked_files(pointer["files"], f"{uri}/{MANIFEST}")
    if pointer.get("format") == FORMAT:
        version = str(pointer.get("version", ""))
        if not re.fullmatch(r"[0-9A-Za-z_-]+", version) or pointer.get("prefix") != f"{VERSIONS}/{version}":
            raise PublishError(f"{uri}/{MANIFEST}: bad version {version!r}")
        return Published(uri, version, f"{VERSIONS}/{version}", files, pointer)
    return Published(uri, "", "", files, pointer)      # a manifest of the first layout: files beside it


def is_published_dir(uri: str) -> bool:
    """Whether ``uri`` holds a winnow pointer (a published directory)."""
    try:
        pointer, _ = _get_pointer(uri.rstrip("/"))
    except PublishError:
        return False
    return pointer is not None


def verify(uri: str) -> Published:
    """Resolve the pointer and check that every file it lists is there with its size (one listing,
    no download); IntegrityError names the first that is not."""
    from winnow import s3

    pub = resolve(uri)
    base = "/".join(x for x in (pub.uri, pub.prefix) if x)
    sizes = s3.list_sizes(base)
    for name, meta in pub.files.items():
        if name not in sizes:
            raise IntegrityError(f"{pub.file_uri(name)} is missing (listed by {pub.uri}/{MANIFEST})")
        if sizes[name] != meta["size"]:
            raise IntegrityError(f"{pub.file_uri(name)} has {sizes[name]} bytes, the manifest says {meta['size']}")
    return pub


def _object_sha(uri: str) -> str | None:
    from winnow import s3

    bucket, key = s3.split(uri)
    try:
        head = s3.call("cannot stat", uri, s3.client().head_object, Bucket=bucket, Key=key)
    except s3.S3NotFound:
        return None
    return (head.get("Metadata") or {}).get(SHA_META, "")


def read_published(uri: str, name: str | None = None) -> bytes:
    """The bytes of a published file, verified: ``name`` inside the published directory ``uri``
    (through its pointer, against the manifest's sha256), or, without ``name``, the published
    file ``uri`` (against its ``winnow-sha256`` metadata). IntegrityError on any mismatch."""
    from winnow import s3

    if name is None:
        want = _object_sha(uri)
        if want is None:
            raise IntegrityError(f"{uri} is not published (no such object)")
        if not want:
            raise IntegrityError(f"{uri} carries no {SHA_META}: not published by winnow")
        data = s3.read_bytes(uri)
        if hashlib.sha256(data).hexdigest() != want:
            raise IntegrityError(f"{uri}: sha256 differs from its {SHA_META} metadata")
        return data
    return resolve(uri).read(name)


def download_output(uri: str, dest: str | Path) -> Path:
    """A local copy of the current version of a published directory in ``dest``: each file
    downloaded atomically (skipped when already there with the manifest's sha256) and checked
    against the manifest; local files the version lacks are removed. IntegrityError on a mismatch."""
    from winnow import s3
    from winnow.io import _TMP, UnsafePath, safe_join

    pub = resolve(uri)
    dest = Path(dest)
    targets = {}
    for name in pub.files:
        try:
            targets[name] = safe_join(dest, name, what="manifest entry")
        except UnsafePath as exc:
            raise PublishError(f"{pub.uri}/{MANIFEST}: {exc}") from None
    for name, meta in pub.files.items():
        t = targets[name]
        if t.is_file() and t.stat().st_size == meta["size"] and file_sha256(t) == meta["sha256"]:
            continue
        try:
            s3.download(pub.file_uri(name), t)
        except s3.S3NotFound:
            raise IntegrityError(f"{pub.file_uri(name)} is missing (listed by {pub.uri}/{MANIFEST})") from None
        if t.stat().st_size != meta["size"] or file_sha256(t) != meta["sha256"]:
            t.unlink(missing_ok=True)
            raise IntegrityError(f"{pub.file_uri(name)}: bytes differ from the manifest (sha256 {meta['sha256'][:12]}…)")
    keep = set(targets.values())
    for p in (dest.rglob("*") if dest.exists() else []):
        if p.is_file() and p not in keep and not _TMP.match(p.name):
            p.unlink(missing_ok=True)
    return dest


def is_complete(uri: str) -> bool:
    """A published directory has a pointer whose files are all there with their sizes; a published
    file exists and carries winnow's sha256."""
    try:
        verify(uri)
        return True
    except PublishError:
        pass
    sha = _object_sha(uri)
    return bool(sha)


# --- publishing ---------------------------------------------------------------------------------

def _version_id() -> str:
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:8]}"


def _delete_listed(bucket: str, prefix: str, names) -> None:
    """Delete ``prefix/<name>`` for each name (a winnow manifest's list), then nothing else. A name
    that is not a plain relative path (``../x``, ``/x``: a forged pointer or manifest) is left
    alone, never sent as a key that a store might resolve outside the prefix."""
    from winnow import s3
    from winnow.io import UnsafePath, check_relative

    c = s3.client()
    for n in names:
        try:
            check_relative(n, "listed file")
        except UnsafePath:
            continue
        k = f"{prefix}/{n}" if prefix else n
        s3.call("cannot delete", f"s3://{bucket}/{k}", c.delete_object, Bucket=bucket, Key=k)


def _retire(bucket: str, key: str, entry: dict | None, keep: set[str]) -> None:
    """Delete a version a pointer no longer names: the files its record lists (and its manifest)."""
    if not entry or entry.get("version") in keep:
        return
    version, names = str(entry.get("version", "")), entry.get("files") or []
    if version and re.fullmatch(r"[0-9A-Za-z_-]+", version):
        _delete_listed(bucket, f"{key}/{VERSIONS}/{version}", [*names, VERSION_MANIFEST])
    elif version == "" and entry.get("prefix") == "":        # the first layout: files beside the pointer
        _delete_listed(bucket, key, [n for n in names if n != MANIFEST and not n.startswith(f"{VERSIONS}/")])


def _sweep_orphans(bucket: str, key: str, keep: set[str], grace_s: float) -> int:
    """Delete versions no pointer names whose manifest is older than ``grace_s`` (a publisher that
    died, or lost a race without conditional writes), by what their own manifest lists."""
    from winnow import s3

    c = s3.client()
    base = f"s3://{bucket}/{key}/{VERSIONS}"
    n = 0
    try:
        names = s3.list_keys(base)
    except s3.S3Error:
        return 0
    for k in names:
        version, _, rest = k.partition("/")
        if rest != VERSION_MANIFEST or version in keep:
            continue
        mkey = f"{key}/{VERSIONS}/{version}/{VERSION_MANIFEST}"
        head = s3.call("cannot stat", f"s3://{bucket}/{mkey}", c.head_object, Bucket=bucket, Key=mkey)
        if time.time() - head["LastModified"].timestamp() < grace_s:
            continue
        try:
            m = json.loads(s3.read_bytes(f"s3://{bucket}/{mkey}"))
            files = list(_checked_files(m.get("files", {}), mkey))
        except (ValueError, PublishError, AttributeError):
            continue       # not a manifest we can trust: leave it
        _delete_listed(bucket, f"{key}/{VERSIONS}/{version}", [*files, VERSION_MANIFEST])
        n += 1
    return n


def _put_pointer(bucket: str, key: str, body: bytes, etag: str | None) -> bool:
    """Write the pointer on condition that it is still ``etag`` (absent when None). False when the
    condition failed (another publisher won); a store that rejects conditional writes gets a plain PUT."""
    from botocore.exceptions import BotoCoreError, ClientError

    from winnow import s3

    c = s3.client()
    pkey = f"{key}/{MANIFEST}"
    cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
    try:
        c.put_object(Bucket=bucket, Key=pkey, Body=body, ContentType="application/json", **cond)
        return True
    except ClientError as exc:
        code = s3.error_code(exc)
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
            return False
        if code not in ("NotImplemented", "InvalidArgument", "InvalidRequest", "501"):
            raise s3._explain(exc, f"s3://{bucket}/{pkey}", "cannot write") from None
    except BotoCoreError as exc:
        raise s3._explain(exc, f"s3://{bucket}/{pkey}", "cannot write") from None
    s3.call("cannot write", f"s3://{bucket}/{pkey}", c.put_object, Bucket=bucket, Key=pkey, Body=body,
            ContentType="application/json")
    return True


def _publish_file(local_path: Path, uri: str) -> dict:
    from winnow import s3

    existing = _object_sha(uri)
    if existing == "":
        raise PublishError(f"{uri} exists and was not published by winnow (no {SHA_META} metadata); "
                           "refusing to overwrite it")
    bucket, key = s3.split(uri)
    if "/" in key:          # temporary keys of killed uploads beside it
        s3.sweep_temporary(f"s3://{bucket}/{key.rsplit('/', 1)[0]}")
    s3.upload(local_path, uri, metadata={SHA_META: file_sha256(local_path)})
    return {"uri": uri, "files": 1}


def _sweep_legacy_temp(bucket: str, key: str, grace_s: float) -> None:
    """Temporary prefixes of the first layout (``<out>.<32 hex>.tmp/...``) older than ``grace_s``."""
    from winnow import s3

    parent, _, leaf = key.rpartition("/")
    pat = re.compile(rf"^{re.escape(key)}\.[0-9a-f]{{32}}\.tmp/")
    c = s3.client()
    try:
        pages = list(c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{key}."))
    except Exception:
        return
    for page in pages:
        for o in page.get("Contents", []):
            if pat.match(o["Key"]) and time.time() - o["LastModified"].timestamp() > grace_s:
                s3.call("cannot delete", f"s3://{bucket}/{o['Key']}", c.delete_object, Bucket=bucket, Key=o["Key"])


def _publish_dir(local_path: Path, uri: str, grace_s: float) -> dict:
    from winnow import s3
    from winnow.io import check_relative, owner_token

    bucket, key = _split(uri)
    if not key:
        raise PublishError(f"{uri}: publish a directory under a prefix, not a bucket's root")
    files = _files(local_path)
    for name, _ in files:
        check_relative(name, "output file")
    s3.sweep_temporary(f"s3://{bucket}/{key}", grace_s)
    _sweep_legacy_temp(bucket, key, grace_s)
    pointer, etag = _get_pointer(uri)          # refuses a pointer that is not winnow's, before any write
    version = _version_id()
    vprefix = f"{key}/{VERSIONS}/{version}"
    manifest = {"format": FORMAT, "version": version, "prefix": f"{VERSIONS}/{version}",
                "files": {name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for name, p in files},
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(), "writer": owner_token()}
    body = json.dumps(manifest, indent=1, sort_keys=True).encode()
    c = s3.client()
    committed = False
    try:
        # 1. the version's manifest first: whatever happens next, winnow's own record lists its keys
        s3.call("cannot write", f"s3://{bucket}/{vprefix}/{VERSION_MANIFEST}", c.put_object, Bucket=bucket,
                Key=f"{vprefix}/{VERSION_MANIFEST}", Body=body, ContentType="application/json")
        # 2. the files, each under the new version's prefix (invisible until the pointer names it)
        for name, p in files:
            s3.upload_raw(p, f"s3://{bucket}/{vprefix}/{name}")
        sizes = s3.list_sizes(f"s3://{bucket}/{vprefix}")
        for name, meta in manifest["files"].items():
            if sizes.get(name) != meta["size"]:
                raise PublishError(f"s3://{bucket}/{vprefix}/{name}: {sizes.get(name)} bytes stored, "
                                   f"{meta['size']} written")
        # 3. the pointer, last, on condition that nobody replaced the one this version follows
        for _ in range(POINTER_RETRIES):
            prev = _record(pointer)
            new = dict(manifest, previous=prev)
            if _put_pointer(bucket, key, json.dumps(new, indent=1, sort_keys=True).encode(), etag):
                committed = True
                break
            pointer, etag = _get_pointer(uri)   # another publisher won: follow its version
        if not committed:
            raise PublishError(f"{uri}: the pointer kept changing under {POINTER_RETRIES} concurrent publishers")
    finally:
        if not committed:     # a failed publish leaves nothing: its files, then its manifest
            try:
                _delete_listed(bucket, vprefix, [*manifest["files"], VERSION_MANIFEST])
            except S3Error:
                pass          # swept by a later publish once older than the grace period
    # 4. retire what the replaced pointer's predecessor was (never the current or previous version)
    keep = {version, str((prev or {}).get("version", ""))}
    _retire(bucket, key, (pointer or {}).get("previous") if pointer and pointer.get("format") == FORMAT else None, keep)
    _sweep_orphans(bucket, key, keep, grace_s)
    return {"uri": f"s3://{bucket}/{key}", "files": len(files), "version": version}


def _record(pointer: dict | None) -> dict | None:
    """What a new pointer remembers of the one it replaces: its version and file names."""
    if pointer is None:
        return None
    if pointer.get("format") == FORMAT:
        return {"version": pointer.get("version"), "prefix": pointer.get("prefix"), "files": sorted(pointer["files"])}
    return {"version": "", "prefix": "", "files": sorted(pointer["files"])}


def publish_output(local_path: str | Path, uri: str, inputs: list[str] | None = None,
                   grace_s: float = ORPHAN_GRACE_S) -> dict:
    """Publish one output to ``uri``: a file as one object, a directory as a new version behind its
    pointer (see the module doc). ``inputs``: locations the pipeline reads; a ``uri`` overlapping
    one is refused (OverlapError)."""
    check_overlap(uri, inputs or [])
    local_path = Path(local_path)
    if local_path.is_file():
        return _publish_file(local_path, uri)
    return _publish_dir(local_path, uri, grace_s)


def storage_prefix(storage_uri: str, env: dict | None = None, params_yaml: str | Path = "params.yaml") -> str:
    """Where a run publishes: ``storage.uri`` itself for the workspace (``dvc repro``, ``winnow
    run``), ``<storage.uri>/exps/<name>`` inside a ``dvc exp run`` (DVC sets DVC_EXP_BASELINE_REV,
    and DVC_EXP_NAME when named; an unnamed one is named by its params). A sweep's experiments then
    never overwrite the workspace's published outputs, which stay those its dvc.lock names."""
    env = os.environ if env is None else env
    if not env.get("DVC_EXP_BASELINE_REV"):
        return storage_uri
    name = env.get("DVC_EXP_NAME") or ""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):   # also keeps a hostile name inside the prefix
        digest = hashlib.sha256(Path(params_yaml).read_bytes() if Path(params_yaml).exists() else b"").hexdigest()
        name = f"exp-{digest[:12]}"
    return f"{storage_uri.rstrip('/')}/exps/{name}"


def publish_stage(stage: str, storage_uri: str, dvc_yaml: str | Path = "dvc.yaml",
                  inputs: list[str] | None = None) -> list[dict]:
    """Publish every output of ``stage`` under ``storage_uri`` (same relative paths). ``inputs``
    (default: every s3:// location in the params.yaml beside ``dvc_yaml``) must not overlap
    ``storage_uri``: a prefix that holds or lies inside the pool is refused before anything is written."""
    inputs = _params_inputs(dvc_yaml) if inputs is None else inputs
    check_overlap(storage_uri, inputs)
    out = []
    for rel in stage_outputs(stage, dvc_yaml):
        if Path(rel).exists():
            out.append(publish_output(rel, f"{storage_uri.rstrip('/')}/{rel}", inputs))
    return out
