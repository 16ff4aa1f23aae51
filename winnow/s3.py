"""S3 through boto3: the client, and whole-object transfers that never leave a partial object.

Credentials come from boto3's standard chain (env, shared config/credentials files, instance
roles); nothing here reads, logs or stores them. An S3-compatible store is reached through
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (boto3 reads both itself) or ``WINNOW_S3_ENDPOINT``.
Requests retry with back-off (boto3's ``standard`` mode, ``WINNOW_S3_MAX_ATTEMPTS``, default 8);
large objects move as multipart transfers. An upload goes to a temporary key and is copied onto
its name only when complete, so a reader never sees a half-written object; on failure the temporary
key is deleted and its multipart uploads aborted, and what a killed writer left (temporary keys and
multipart uploads named ``<key>.<host>-<pid>-<rand>.tmp``) is removed by :func:`sweep_temporary`
once that process is gone. Error messages name the object, never credentials (URLs are scrubbed).
"""
from __future__ import annotations

import functools
import os
import re
import time
import uuid
from pathlib import Path

from winnow.errors import WinnowError
from winnow.io import UnsafePath


class S3Error(WinnowError, RuntimeError):
    pass


class S3NotFound(S3Error, FileNotFoundError):
    """The object does not exist: an S3Error that also reads as a missing file."""


class UnsafeKey(S3Error, UnsafePath):
    """A key (listed, or in a URI) that would resolve outside its local destination: ``..``,
    ``prefix//abs/path``, an empty segment. Refused, never written."""


def _scrub(text: str) -> str:
    from winnow.track import scrub

    return scrub(text)


def is_s3(uri: str | os.PathLike) -> bool:
    return os.fspath(uri).startswith("s3://")


def split(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    rest = uri.removeprefix("s3://")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise S3Error(f"not an s3:// URI with a bucket: {uri!r}")
    return bucket, key


def use_endpoint(url: str) -> None:
    """The endpoint from params (storage.endpoint_url), unless the environment names one."""
    if not os.environ.get("WINNOW_S3_ENDPOINT"):
        os.environ["WINNOW_S3_ENDPOINT"] = url
        client.cache_clear()


@functools.cache
def client():
    import boto3
    from botocore.config import Config

    cfg = Config(retries={"mode": "standard", "max_attempts": int(os.environ.get("WINNOW_S3_MAX_ATTEMPTS", "8"))},
                 connect_timeout=10, read_timeout=120)
    endpoint = os.environ.get("WINNOW_S3_ENDPOINT") or None     # else boto3's own AWS_ENDPOINT_URL[_S3]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=cfg)


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=64 * 2**20, max_concurrency=4)


def _explain(exc: Exception, uri: str, what: str) -> S3Error:
    from botocore.exceptions import ClientError

    uri = _scrub(uri)
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NotFound"):
            return S3NotFound(f"{what} {uri}: {code} (no such object)")
        return S3Error(_scrub(f"{what} {uri}: {code or 'error'} ({exc.response.get('Error', {}).get('Message', '')})"))
    return S3Error(_scrub(f"{what} {uri}: {type(exc).__name__}: {exc}"))


def error_code(exc: Exception) -> str:
    """The S3 error code of a botocore ClientError (``PreconditionFailed``, ``NoSuchKey`` …), else ''."""
    resp = getattr(exc, "response", None)
    return (resp or {}).get("Error", {}).get("Code", "") if isinstance(resp, dict) else ""


def call(what: str, uri: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` (a boto3 client call) with its botocore errors as S3Error (scrubbed)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(*args, **kwargs)
    except (ClientError, BotoCoreError) as exc:
        raise _explain(exc, uri, what) from None


def exists(uri: str) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split(uri)
    try:
        client().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise _explain(exc, uri, "cannot stat") from None
    except BotoCoreError as exc:
        raise _explain(exc, uri, "cannot stat") from None


def read_bytes(uri: str) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split(uri)
    try:
        return client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except (ClientError, BotoCoreError) as exc:
        raise _explain(exc, uri, "cannot read") from None


def open_stream(uri: str):
    """A sequential binary stream of the object (for tars: read while downloading, never staged on disk)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split(uri)
    try:
        return client().get_object(Bucket=bucket, Key=key)["Body"]
    except (ClientError, BotoCoreError) as exc:
        raise _explain(exc, uri, "cannot open") from None


def list_names(uri: str) -> list[str]:
    """Object names directly under the prefix ``uri`` (one level, like a directory listing)."""
    return sorted(_list(uri, recursive=False))


def list_keys(uri: str) -> list[str]:
    """Every key under the prefix ``uri`` (recursive), relative to it."""
    return sorted(list_sizes(uri))


def list_sizes(uri: str) -> dict[str, int]:
    """Every key under the prefix ``uri`` (recursive), relative to it, with its size in bytes."""
    return {k: size for k, (size, _) in list_objects(uri).items()}


def list_objects(uri: str, recursive: bool = True) -> dict[str, tuple[int, str]]:
    """Every key under the prefix ``uri``, relative to it, with its size and ETag (what changes when
    the object's bytes do: the identity of a remote input in a job's key and in the local cache)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    kw = {} if recursive else {"Delimiter": "/"}
    out: dict[str, tuple[int, str]] = {}
    try:
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, **kw):
            out.update({o["Key"][len(prefix):]: (o["Size"], o.get("ETag", "").strip('"')) for o in page.get("Contents", [])})
    except (ClientError, BotoCoreError) as exc:
        raise _explain(exc, uri, "cannot list") from None
    return out


def _list(uri: str, recursive: bool) -> dict[str, int]:
    return {k: size for k, (size, _) in list_objects(uri, recursive).items()}


def download(uri: str, dest: str | Path) -> Path:
    """Download to ``dest`` through a temp file (fsynced) renamed into place when complete."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    from winnow.io import atomic_file

    dest = Path(dest)
    bucket, key = split(uri)
    try:
        with atomic_file(dest) as tmp:
            client().download_file(bucket, key, str(tmp), Config=_transfer_config())
    except (ClientError, BotoCoreError, Boto3Error) as exc:
        raise _explain(exc, uri, "cannot download") from None
    return dest


def abort_multipart(uri: str) -> int:
    """Abort every multipart upload whose key is exactly that of ``uri`` (a temporary key of ours:
    its name is unique to one writer). Returns how many were aborted; errors are ignored."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split(uri)
    c, n = client(), 0
    try:
        for page in c.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=key):
            for u in page.get("Uploads", []):
                if u["Key"] == key:
                    c.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=u["UploadId"])
                    n += 1
    except (ClientError, BotoCoreError):
        pass
    return n


def upload_raw(src: str | Path, uri: str, extra: dict | None = None) -> None:
    """Upload as is (multipart when large); for keys that are temporary or unpublished already.
    On failure the object's unfinished multipart uploads are aborted."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    from winnow.io import terminate_unwinds

    bucket, key = split(uri)
    ok = False
    try:
        with terminate_unwinds():
            client().upload_file(str(src), bucket, key, ExtraArgs=extra or None, Config=_transfer_config())
        ok = True
    except (ClientError, BotoCoreError, Boto3Error) as exc:
        raise _explain(exc, uri, "cannot upload") from None
    finally:
        if not ok:
            abort_multipart(uri)


def temp_key(key: str) -> str:
    """A temporary key beside ``key`` naming its writer: ``<key>.<host>-<pid>-<rand>.tmp``."""
    from winnow.io import owner_token

    return f"{key}.{owner_token()}-{uuid.uuid4().hex[:12]}.tmp"


_TEMP_KEY = re.compile(r"^(?P<key>.+)\.(?:(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{12}|[0-9a-f]{32})\.tmp$")
TEMP_GRACE_S = 24 * 3600.0     # a temporary key or multipart upload of another host: stale after this


def sweep_temporary(uri: str, grace_s: float = TEMP_GRACE_S) -> dict:
    """Delete the temporary keys and abort the multipart uploads under the prefix ``uri`` that a
    killed writer left: those whose writer process is dead (this host), or older than ``grace_s``
    (another host, or no recorded writer). Returns the counts."""
    from winnow.io import owner_gone

    bucket, prefix = split(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    c = client()
    keys, uploads = 0, 0
    for page in call("cannot list", uri, lambda: list(c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix))):
        for o in page.get("Contents", []):
            m = _TEMP_KEY.match(o["Key"])
            if m and owner_gone(m["host"], m["pid"], o["LastModified"].timestamp(), grace_s):
                call("cannot delete", f"s3://{bucket}/{o['Key']}", c.delete_object, Bucket=bucket, Key=o["Key"])
                keys += 1
    try:
        pages = list(c.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix))
    except Exception:       # a store without the listing: nothing to sweep
        pages = []
    for page in pages:
        for u in page.get("Uploads", []):
            m = _TEMP_KEY.match(u["Key"])
            initiated = u["Initiated"].timestamp()
            gone = owner_gone(m["host"], m["pid"], initiated, grace_s) if m else time.time() - initiated > grace_s
            if gone:
                call("cannot abort", f"s3://{bucket}/{u['Key']}", c.abort_multipart_upload, Bucket=bucket,
                     Key=u["Key"], UploadId=u["UploadId"])
                uploads += 1
    return {"temporary_keys": keys, "multipart_uploads": uploads}


def upload(src: str | Path, uri: str, metadata: dict | None = None) -> None:
    """Upload to a temporary key beside ``uri`` (multipart when large), then copy it onto ``uri``
    and delete the temporary key: ``uri`` either keeps its old content or has the new one whole.
    On any failure (SIGTERM included) the temporary key is deleted and its multipart uploads aborted.
    ``metadata``: user metadata stored with the object (``x-amz-meta-*``)."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    from winnow.io import terminate_unwinds

    bucket, key = split(uri)
    tmp_key = temp_key(key)
    c = client()
    extra = {"Metadata": metadata} if metadata else None
    ok = False
    try:
        with terminate_unwinds():
            c.upload_file(str(src), bucket, tmp_key, ExtraArgs=extra, Config=_transfer_config())
            c.copy({"Bucket": bucket, "Key": tmp_key}, bucket, key, Config=_transfer_config(),
                   ExtraArgs={**extra, "MetadataDirective": "REPLACE"} if extra else None)
        ok = True
    except (ClientError, BotoCoreError, Boto3Error) as exc:
        raise _explain(exc, uri, "cannot upload") from None
    finally:
        try:
            c.delete_object(Bucket=bucket, Key=tmp_key)
        except (ClientError, BotoCoreError):
            pass
        if not ok:
            abort_multipart(f"s3://{bucket}/{tmp_key}")
