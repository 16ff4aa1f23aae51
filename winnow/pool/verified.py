"""Which pool files passed the pool gate: one record per set of files, named by their content
identity (as a job's work key names its inputs: size + mtime, or the bytes of small files), kept
in the workspace beside the jobs' work directories. The gate reads every shard through, with every
column; a later stage reading the same files (the filter's probe) may take that as known instead
of reading each shard's uids again. Files changed since, or a pool DVC restored from its cache
without running the gate here, are simply not verified. The trade-off: a file over 1 MiB is known
by size and mtime (winnow.jobs.content_identity), so one altered in place with both kept (bit rot,
``touch -r``) is trusted, and a corrupt page in it then fails the filter's pass naming the shard
instead of being quarantined by ``corrupt_shards: quarantine``."""
from __future__ import annotations

from pathlib import Path

from winnow import io as wio
from winnow.pool.view import Pool

ROOT = Path(".winnow/verified")


def _files_digest(pool: Pool) -> str:
    from winnow.jobs import content_identity, digest

    return digest([pool.uri, content_identity(pool.uri)], 32)


def record(pool: Pool) -> None:
    """Called once the pool gate has passed."""
    wio.write_json(ROOT / f"{_files_digest(pool)}.json", {"uri": pool.uri, "shards": len(pool.shards)})


def is_verified(pool: Pool) -> bool:
    return (ROOT / f"{_files_digest(pool)}.json").exists()
