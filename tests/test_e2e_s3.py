"""End to end with the pool on a real S3 server (SeaweedFS on 127.0.0.1) and every stage's outputs
published there; the canary secret never reaches logs, MLflow or reports."""
import copy
import subprocess
import sys

import pytest

from tests.helpers import MICRO_PARAMS, env_for_subprocess, make_project
from tests.s3server import BUCKET, SECRET_KEY
from winnow import publish, s3

pytestmark = pytest.mark.slow


def test_pipeline_reads_its_pool_from_s3_and_publishes_every_output(s3_server, demo_pool, tmp_path_factory):
    pool_uri = f"s3://{BUCKET}/e2e/pool"
    for p in sorted(demo_pool.rglob("*")):
        if p.is_file():
            s3.upload(p, f"{pool_uri}/{p.relative_to(demo_pool).as_posix()}")
    params = copy.deepcopy(MICRO_PARAMS)
    params["pool"].update(source="datacomp", uri=pool_uri)
    params["scorer"]["train"]["trusted_uri"] = f"{pool_uri}/trusted"
    params["storage"] = {"uri": f"s3://{BUCKET}/e2e/run", "endpoint_url": s3_server.endpoint}
    proj = make_project(tmp_path_factory.mktemp("e2e-s3"), params)
    env = env_for_subprocess()
    env.pop("WINNOW_S3_ENDPOINT")            # the endpoint comes from params.yaml; credentials from the env
    proc = subprocess.run([sys.executable, "-m", "winnow", "run"], cwd=proj, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "published" in proc.stderr

    # every declared output of every stage is on the server, complete, and equal to the local one
    for stage in ("pool", "tasks", "plan", "scorer", "embed", "filter", "reshard", "train", "evaluate", "report"):
        for rel in publish.stage_outputs(stage, proj / "dvc.yaml"):
            if (proj / rel).exists():
                assert publish.is_complete(f"{params['storage']['uri']}/{rel}"), rel
    run = params["storage"]["uri"]
    # directories are versions behind a verified pointer; files are single objects
    assert publish.read_published(f"{run}/data/filter", "uids.npy") == (proj / "data/filter/uids.npy").read_bytes()
    assert "checkpoint.pt" in publish.resolve(f"{run}/models/clip").files
    assert publish.read_published(f"{run}/data/subset", "meta.json") == (proj / "data/subset/meta.json").read_bytes()
    assert s3.read_bytes(f"{run}/reports/eval/summary.json") == (proj / "reports/eval/summary.json").read_bytes()
    # stages DVC skips publish nothing; `winnow publish` republishes every current output
    s3.client().delete_object(Bucket=BUCKET, Key="e2e/run/data/filter/_SUCCESS.json")
    pub = subprocess.run([sys.executable, "-m", "winnow", "publish"], cwd=proj, env=env, capture_output=True, text=True)
    assert pub.returncode == 0, pub.stderr[-2000:]
    assert publish.is_complete(f"{run}/data/filter") and "filter: s3://" in pub.stdout
    manifest = (proj / "data/pool/manifest.json").read_text()
    assert pool_uri in manifest

    # the canary secret is nowhere: not in the output, logs, params dumps, MLflow's store or reports
    assert SECRET_KEY not in proc.stdout + proc.stderr
    written = [proj / x for x in ("data", "models", "reports", "mlruns", "mlartifacts", ".winnow", ".dvc")]
    files = [p for d in written for p in d.rglob("*") if p.is_file()] + [proj / "mlflow.db", proj / "dvc.lock"]
    assert len(files) > 50
    for p in files:
        if p.stat().st_size < 50 * 2**20:
            assert SECRET_KEY.encode() not in p.read_bytes(), p
