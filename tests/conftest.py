import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("WINNOW_PARENT_RUN_ID", None)

ROOT = Path(__file__).resolve().parent.parent

# Small enough for a 2-core CI machine, large enough that every noise kind occurs.
MICRO_PARAMS = {
    "seed": 0,
    "pool": {"source": "demo", "uri": "data/pool", "num_samples": 600, "shard_size": 200,
             "trusted_samples": 400, "image_size": 64, "min_downloaded": 0.5},
    "eval": {"suite": "demo", "data_root": "data/tasks", "test_samples": 96, "train_samples": 32, "batch_size": 64},
    "scorer": {"model": "winnow-tiny", "pretrained": None, "train": {"epochs": 3, "batch_size": 64, "lr": 0.001, "warmup": 2},
               "min_auc": 0.5},
    "embed": {"batch_size": 128},
    "filter": {"recipe": "clip_score_top30", "min_kept": 1},
    "train": {"scale": "micro", "seed": 0},
    "tracking": {"uri": "sqlite:///mlflow.db", "experiment": "winnow-test"},
}


def env_for_subprocess() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "winnow-test"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "test@winnow.invalid"
    return env


def make_project(dest: Path, params: dict) -> Path:
    """A throwaway git + DVC repo holding the project's tracked files and the given params."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if f == "dvc.lock" or not (ROOT / f).exists():
            continue
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = env_for_subprocess()
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True)
    return dest


def dvc(project: Path, *args, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(["dvc", *args], cwd=project, env=env_for_subprocess(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def demo_pool(tmp_path_factory):
    """A small demo pool (600 samples, 3 shards), generated once per session."""
    from winnow.config import Pool
    from winnow.pool import demo

    out = tmp_path_factory.mktemp("pool") / "pool"
    cfg = Pool(**{k: v for k, v in MICRO_PARAMS["pool"].items()})
    demo.write_pool(cfg, 0, str(out))
    return out


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One real S3 server (SeaweedFS) per test session; its endpoint and credentials are in the
    environment while it runs (boto3's standard chain reads them, as in production)."""
    from tests.s3server import S3Server
    from winnow import s3

    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    s3.client.cache_clear()
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3.client.cache_clear()


def kill_when(proc, ready, timeout: float = 120, poll: float = 0.005) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` is true (or it exits, or ``timeout`` passes): the
    kill tests' way of interrupting a job mid-run."""
    import signal
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(poll)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
