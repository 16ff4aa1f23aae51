"""Helpers the tests import (plain functions and constants; the fixtures are in conftest.py).

Every test module imports them one way::

    from tests.helpers import MICRO_PARAMS, dvc, make_project

(``python -m pytest``, as ``make test`` runs it, puts the repository root on sys.path.)
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import yaml

ROOT = Path(__file__).resolve().parent.parent

# Small enough for a 2-core CI machine, large enough that every noise kind occurs.
MICRO_PARAMS = {
    "seed": 0,
    "pool": {"source": "demo", "uri": "data/pool", "num_samples": 600, "shard_size": 200,
             "trusted_samples": 400, "image_size": 64, "min_downloaded": 0.5, "max_unreadable_tars": 0.0},
    "eval": {"suite": "demo", "data_root": "data/tasks", "test_samples": 96, "train_samples": 32, "batch_size": 64},
    "scorer": {"model": "winnow-tiny", "pretrained": None, "train": {"epochs": 3, "batch_size": 64, "lr": 0.001, "warmup": 2},
               "min_auc": 0.5},
    "embed": {"batch_size": 128},
    "filter": {"recipe": "clip_score_top30", "min_kept": 1},
    "train": {"scale": "micro", "seed": 0},
    "tracking": {"uri": "sqlite:///mlflow.db", "experiment": "winnow-test"},
}

# the `swept` fixture's `dvc exp run` points (name, recipe); no_filter first: basic's report shows Δ against it
POINTS = [("pt-nofilter", "no_filter"), ("pt-basic", "basic")]


def env_for_subprocess() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "winnow-test"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "test@winnow.invalid"
    return env


def git(project: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=project, env=env_for_subprocess(), check=True, capture_output=True,
                          text=True)


def make_project(dest: Path, params: dict, dvc_cache: Path | None = None) -> Path:
    """A throwaway git + DVC repo holding the project's files as the working tree has them (tracked
    and untracked, not git-ignored) and the given params.
    ``dvc_cache``: a DVC cache directory to use instead of the repo's own ``.dvc/cache`` (set in
    ``.dvc/config.local``, which git ignores), so that projects copied from this one share it."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if f == "dvc.lock" or not (ROOT / f).exists():
            continue
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    write_params(dest, params)
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "init"]):
        git(dest, *cmd)
    if dvc_cache is not None:
        Path(dvc_cache).mkdir(parents=True, exist_ok=True)
        (dest / ".dvc" / "config.local").write_text(f"[cache]\n    dir = {Path(dvc_cache).resolve()}\n")
    return dest


def copy_project(src: Path, dest: Path) -> Path:
    """A copy of a built project (workspace, git, DVC, MLflow): a test that edits params or re-runs
    stages does it in its own copy, never in a project other tests read. The DVC cache is not
    copied: a project made with ``make_project(..., dvc_cache=...)`` keeps pointing at the shared
    one (outputs and run-cache entries are content-addressed, so sharing never changes a result;
    a stage another copy already ran with the same inputs is restored instead of re-run). MLflow's
    store moves its artifact locations to the copy itself (winnow.track.relocate_artifacts)."""
    src, dest = Path(src), Path(dest)
    shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True,
                    ignore=lambda d, names: ["cache", "tmp"] if Path(d) == src / ".dvc" else [])
    return dest


def read_params(project: Path) -> dict:
    return yaml.safe_load((project / "params.yaml").read_text())


def write_params(project: Path, params: dict) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def dvc(project: Path, *args, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(["dvc", *args], cwd=project, env=env_for_subprocess(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def winnow(project: Path, *args, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m winnow <args>`` in ``project``."""
    proc = subprocess.run([sys.executable, "-m", "winnow", *args], cwd=project, env=env or env_for_subprocess(),
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"winnow {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def changed_stages(proc: subprocess.CompletedProcess, stages: list[str]) -> list[str]:
    """The stages DVC found out of date in a ``dvc repro`` / ``dvc exp run`` output, in ``stages``
    order: run, or restored from the run-cache because a copy of the project already ran them with
    the same inputs ("is cached - skipping run")."""
    out = proc.stdout + proc.stderr
    return [s for s in stages if f"Running stage '{s}'" in out or f"Stage '{s}' is cached - skipping run" in out]


def bench_module(name: str) -> ModuleType:
    """``bench/<name>.py`` as a module (the benchmarks' pool generators), without touching sys.path."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kill_when(proc, ready, timeout: float = 120, poll: float = 0.005) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` is true (or it exits, or ``timeout`` passes): the
    kill tests' way of interrupting a job mid-run."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(poll)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def write_caption_tar(path: Path, n: int = 128, seed: int = 0) -> Path:
    """A webdataset tar of ``n`` random 64 px images with short captions: training's smallest input."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as w:
        for i in range(n):
            w.write({"__key__": f"{i:05d}", "txt": f"a picture number {i % 7}",
                     "jpg": Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))})
    return path
