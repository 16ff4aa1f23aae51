"""The workspace lock: one run at a time per project directory.

``winnow run``, a Prefect flow run and a sweep hold ``.winnow/flow.lock`` (an flock, released by
the kernel when the holder dies) for as long as they run; a second one fails at once, naming the
first. Every stage checks it too (``check_workspace``, from ``winnow.stage``), so a bare
``dvc repro`` / ``dvc exp run`` started beside a holder cannot run its stages between the holder's.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

from winnow.errors import WinnowError

LOCK = ".winnow/flow.lock"


class WorkspaceBusy(WinnowError, RuntimeError):
    """Another run (a Prefect flow run, a sweep) is using this workspace."""


TOKEN_ENV = "WINNOW_WORKSPACE_TOKEN"   # the holder's token; its child processes inherit it


@contextlib.contextmanager
def workspace_lock(path: str | Path = LOCK) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (flock: released by the kernel when the holder dies), or
    raise WorkspaceBusy naming the holder: two runs never share params.yaml and the outputs. The
    lock file names the holder and a random token, which the holder's environment carries to every
    process it starts (``dvc repro`` and its stages): check_workspace lets exactly those through."""
    import fcntl
    import os
    import secrets

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = _holder(fh.read())
        fh.close()
        raise WorkspaceBusy(f"this workspace is in use by another run ({holder}; lock {path}): "
                            "one run at a time per workspace") from None
    token, before = secrets.token_hex(16), os.environ.get(TOKEN_ENV)
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} ({' '.join(sys.argv)[:200]})\ntoken {token}\n")
        fh.flush()
        os.environ[TOKEN_ENV] = token
        yield
    finally:
        if before is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = before
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def _holder(text: str) -> str:
    return (text.splitlines() or ["unknown"])[0].strip() or "unknown"


def check_workspace(path: str | Path = LOCK) -> None:
    """Refuse to run a stage while another execution holds the workspace (WorkspaceBusy naming it).
    DVC's own lock covers only the paths a command touches, so a ``dvc exp run`` started beside a
    ``winnow run`` would run its early stages between the other's, with its params. A process the
    holder started (its environment carries the holder's token) goes on. A token, not the process
    tree: pids repeat across pid namespaces (a holder that is pid 1 in a container)."""
    import fcntl
    import os

    path = Path(path)
    if not path.exists():
        return
    with open(path, encoding="utf-8") as fh:
        try:   # a shared probe, released at once: free unless a holder has it exclusively
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fh, fcntl.LOCK_UN)
            return
        except BlockingIOError:
            text = fh.read()
    token = next((line.split()[1] for line in text.splitlines() if line.startswith("token ") and len(line.split()) == 2), None)
    if token is not None and os.environ.get(TOKEN_ENV) == token:
        return
    raise WorkspaceBusy(f"this workspace is in use by another run ({_holder(text)}; lock {path}): one run at a time "
                        "per workspace (a DVC experiment can run beside it in its own copy: dvc exp run --temp, or --queue)")
