"""S3 through boto3: the client, and whole-object transfers that never leave a partial object.

Credentials come from boto3's standard chain (env, shared config/credentials files, instance
roles); nothing here reads, logs or stores them. An S3-compatible store is reached through
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (boto3 reads both itself) or ``WINNOW_S3_ENDPOINT``.
Requests retry with back-off (boto3's ``standard`` mode, ``WINNOW_S3_MAX_ATTEMPTS``, default 8);
large objects move as multipart transfers. An upload goes to a temporary key and is copied onto
its name only when complete, so a reader never sees a half-written object.
"""
from __future__ import annotations

import functools
import os
import uuid
from pathlib import Path


class S3Error(RuntimeError):
    pass


class S3NotFound(S3Error, FileNotFoundError):
    """The object does not exist: an S3Error that also reads as a missing file."""


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

    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NotFound"):
            return S3NotFound(f"{what} {uri}: {code} (no such object)")
        return S3Error(f"{what} {uri}: {code or 'error'} ({exc.response.get('Error', {}).get('Message', '')})")
    return S3Error(f"{what} {uri}: {type(exc).__name__}: {exc}")


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
    return _list(uri, recursive=True)


def _list(uri: str, recursive: bool) -> dict[str, int]:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    kw = {} if recursive else {"Delimiter": "/"}
    out: dict[str, int] = {}
    try:
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, **kw):
            out.update({o["Key"][len(prefix):]: o["Size"] for o in page.get("Contents", [])})
    except (ClientError, BotoCoreError) as exc:
        raise _explain(exc, uri, "cannot list") from None
    return out


def download(uri: str, dest: str | Path) -> Path:
    """Download to ``dest`` through a temp file renamed into place when complete."""
    from botocore.exceptions import BotoCoreError, ClientError

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    bucket, key = split(uri)
    try:
        client().download_file(bucket, key, str(tmp), Config=_transfer_config())
        os.replace(tmp, dest)
    except (ClientError, BotoCoreError) as exc:
        raise _explain(exc, uri, "cannot download") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def upload_raw(src: str | Path, uri: str) -> None:
    """Upload as is (multipart when large); for keys that are temporary already."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split(uri)
    try:
        client().upload_file(str(src), bucket, key, Config=_transfer_config())
    except (ClientError, BotoCoreError) as exc:
        raise _explain(exc, uri, "cannot upload") from None


def upload(src: str | Path, uri: str) -> None:
    """Upload to a temporary key beside ``uri`` (multipart when large), then copy it onto ``uri``
    and delete the temporary key: ``uri`` either keeps its old content or has the new one whole."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split(uri)
    tmp_key = f"{key}.{uuid.uuid4().hex}.tmp"
    c = client()
    try:
        c.upload_file(str(src), bucket, tmp_key, Config=_transfer_config())
        c.copy({"Bucket": bucket, "Key": tmp_key}, bucket, key, Config=_transfer_config())
    except (ClientError, BotoCoreError) as exc:
        raise _explain(exc, uri, "cannot upload") from None
    finally:
        try:
            c.delete_object(Bucket=bucket, Key=tmp_key)
        except (ClientError, BotoCoreError):
            pass
