"""Every job kind resumes after SIGKILL (filter passes, reshard, evaluation, the scorer stage; embed and
training in test_embed.py and test_train_resume.py): finished units are not redone and the outputs
equal an uninterrupted run's."""
import subprocess
import sys

import pytest

from tests.helpers import ROOT, env_for_subprocess, kill_when


def _bench_pool(path, samples=60000, shards=12):
    sys.path.insert(0, str(ROOT / "bench"))
    import importlib

    gen = importlib.import_module("filter").generate
    gen(path, samples, shards, dim=8)
    return path


@pytest.mark.slow   # builds a 60,000-sample pool
def test_killed_filter_resumes_from_its_finished_shards(tmp_path, monkeypatch):
    from winnow.filters import engine
    from winnow.pool.view import Pool

    pool_dir = _bench_pool(tmp_path / "pool")
    ref = tmp_path / "ref"
    engine.run(engine.load_recipe("basic"), Pool.open(str(pool_dir)), str(ref))

    out, work = tmp_path / "out", tmp_path / "work"
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "from winnow.filters import engine\nfrom winnow.pool.view import Pool\n"
              f"engine.run(engine.load_recipe('basic'), Pool.open({str(pool_dir)!r}), {str(out)!r}, work_root={str(work)!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env_for_subprocess())
    kill_when(proc, lambda: list(work.glob("filter/*/_done/decisions-*.json")))
    done = sorted(p.stem for p in work.glob("filter/*/_done/decisions-*.json"))
    assert 1 <= len(done) < 12, f"killed too early or too late: {done}"
    assert not (out / "uids.npy").exists()

    calls = []
    real = engine._decide
    monkeypatch.setattr(engine, "_decide", lambda steps, fitted, batch, *a: calls.append(batch.shard) or real(steps, fitted, batch, *a))
    engine.run(engine.load_recipe("basic"), Pool.open(str(pool_dir)), str(out), work_root=str(work))
    assert len(calls) == 12 - len(done)                       # only the unfinished shards were decided
    assert not {c for c in calls} & {d.split("-", 1)[1] for d in done}
    for name in ("uids.npy", "decisions.parquet"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert not any((work / "filter").iterdir())                # the work directory goes when complete


def test_killed_reshard_resumes_after_its_last_closed_shard(demo_pool, tmp_path):
    import numpy as np

    from winnow.pool import shards
    from winnow.pool import uids as U
    from winnow.pool.view import Pool
    from winnow.reshard import reshard

    pool = Pool.open(str(demo_pool))
    uids = np.concatenate([shards.read_meta(str(demo_pool), s, ["uid"])["uid"].to_numpy(zero_copy_only=False)
                           for s in pool.shards])
    subset = U.hex_to_array(np.concatenate([uids, uids[::3]]))        # every uid, a third of them twice
    ref = reshard(pool, subset, str(tmp_path / "ref"), shard_size=40)

    U.save(tmp_path / "subset.npy", subset)
    out, work = tmp_path / "out", tmp_path / "work"
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "from winnow.pool import uids as U\nfrom winnow.pool.view import Pool\nfrom winnow.reshard import reshard\n"
              f"reshard(Pool.open({str(demo_pool)!r}), U.load({str(tmp_path / 'subset.npy')!r}), {str(out)!r}, "
              f"shard_size=40, work_root={str(work)!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env_for_subprocess())
    kill_when(proc, lambda: len(list(work.glob("reshard/*/_done/*.json"))) >= 3)
    closed = {p.name: p.stat().st_mtime_ns for p in work.glob("reshard/*/*.tar")
              if (p.parent / "_done" / f"{p.stem}.json").exists()}
    assert 3 <= len(closed) < ref["output_shard_count"], "killed too late"
    assert not out.exists()

    build = next((work / "reshard").iterdir())
    meta = reshard(pool, subset, str(out), shard_size=40, work_root=str(work))
    assert meta == ref
    for f in sorted((tmp_path / "ref").iterdir()):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    for name, mtime in closed.items():         # closed shards were linked into place, never re-written
        assert (out / name).stat().st_mtime_ns == mtime, name
    assert not build.exists()


def test_a_reshard_killed_while_committing_its_output_still_has_every_shard(demo_pool, tmp_path, monkeypatch):
    """The closed tars were moved out of the work directory into the output's temp folder: a kill
    before the output's commit lost them, and the resumed run (every shard marked done) committed an
    output with no tars, which the gate passed and DVC locked."""
    import contextlib

    import numpy as np

    from winnow import reshard as R
    from winnow.pool import shards
    from winnow.pool import uids as U
    from winnow.pool.view import Pool

    pool = Pool.open(str(demo_pool))
    subset = U.hex_to_array(np.concatenate([shards.read_meta(str(demo_pool), s, ["uid"])["uid"].to_numpy(zero_copy_only=False)
                                            for s in pool.shards]))
    ref = R.reshard(pool, subset, str(tmp_path / "ref"), shard_size=40)
    real = R.atomic_dir

    @contextlib.contextmanager
    def killed_before_commit(uri):
        with real(uri) as tmp:
            yield tmp
            raise KeyboardInterrupt        # after the body, before the rename: the temp folder goes
    monkeypatch.setattr(R, "atomic_dir", killed_before_commit)
    with pytest.raises(KeyboardInterrupt):
        R.reshard(pool, subset, str(tmp_path / "out"), shard_size=40, work_root=str(tmp_path / "work"))
    monkeypatch.setattr(R, "atomic_dir", real)
    assert R.reshard(pool, subset, str(tmp_path / "out"), shard_size=40, work_root=str(tmp_path / "work")) == ref
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in (tmp_path / "ref").iterdir())


def test_killed_evaluation_resumes_with_its_finished_tasks(tmp_path, monkeypatch):
    """Each evaluation task is a unit: after SIGKILL the finished tasks are read back, the others run,
    and the rows equal an uninterrupted run's."""
    import torch

    from tests.fixtures import evalsets as F
    from winnow import evaluate as E
    from winnow import models
    from winnow.tasks import Suite, load_suite

    root = tmp_path / "data"
    F.write_evalsets(root, hf=False)
    keys = ["cifar10", "vtab/caltech101", "wilds/fmow", "fairness/dollar_street"]
    torch.manual_seed(0)
    model, pre, tok = models.load("winnow-tiny", None)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ckpt.pt")
    full = {t.key: t for t in load_suite("datacomp38").tasks}
    suite = Suite(layout="datacomp", tasks=[full[k] for k in keys])

    def evaluate(results, work):
        return E.evaluate_suite(model, pre, tok, suite, str(root), str(results), batch_size=4, model_id="m",
                                device="cpu", work_root=str(work))

    ref = evaluate(tmp_path / "ref.jsonl", tmp_path / "refwork")
    work = tmp_path / "work"
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "from winnow import evaluate as E, models\nfrom winnow.tasks import Suite, load_suite\n"
              f"model, pre, tok = models.load('winnow-tiny', {str(tmp_path / 'ckpt.pt')!r})\n"
              "full = {t.key: t for t in load_suite('datacomp38').tasks}\n"
              f"suite = Suite(layout='datacomp', tasks=[full[k] for k in {keys!r}])\n"
              f"E.evaluate_suite(model, pre, tok, suite, {str(root)!r}, {str(tmp_path / 'out.jsonl')!r}, batch_size=4, "
              f"model_id='m', device='cpu', work_root={str(work)!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env_for_subprocess())
    kill_when(proc, lambda: list(work.glob("evaluate/*/_done/*.json")), poll=0.02)
    done = sorted(p.stem.replace("__", "/") for p in work.glob("evaluate/*/_done/*.json"))
    assert 1 <= len(done) < len(keys), f"killed too early or too late: {done}"

    ran, real = [], E.classify
    monkeypatch.setattr(E, "classify", lambda r, task, *a, **k: ran.append(task.key) or real(r, task, *a, **k))
    rows = evaluate(tmp_path / "out.jsonl", work)
    assert sorted(ran) == sorted(set(keys) - set(done))       # only the unfinished tasks ran
    strip = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in rows] == \
        [{k: v for k, v in r.items() if k not in strip} for r in ref]


@pytest.mark.slow   # trains the demo scorer twice (killed, then resumed)
def test_killed_scorer_stage_resumes_from_its_latest_checkpoint(tmp_path):
    """The scorer is a job of its own (``.winnow/work/scorer/<key>``): its stage, killed after a
    checkpoint, resumes from it when run again."""
    from tests.helpers import MICRO_PARAMS, make_project

    params = {**MICRO_PARAMS, "pool": {**MICRO_PARAMS["pool"], "num_samples": 200, "shard_size": 100, "trusted_samples": 192},
              "scorer": {**MICRO_PARAMS["scorer"], "min_auc": 0.0,    # resumption, not quality
                         "train": {**MICRO_PARAMS["scorer"]["train"], "epochs": 4}}}
    project = make_project(tmp_path / "project", params)
    env = env_for_subprocess()
    for stage in ("pool", "plan"):
        subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=project, env=env, check=True, capture_output=True)
    proc = subprocess.Popen([sys.executable, "-m", "stages.scorer"], cwd=project, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from winnow.train import _checkpoint_epoch

    def saved():        # epoch 1's checkpoint is complete (it loads)
        return any(_checkpoint_epoch(c) == 1 for c in project.glob(".winnow/work/scorer/*/run/checkpoints/epoch_1.pt"))

    kill_when(proc, saved, timeout=600, poll=0.2)
    assert not (project / "models" / "scorer" / "checkpoint.pt").exists(), "killed too late"
    again = subprocess.run([sys.executable, "-m", "stages.scorer"], cwd=project, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not (project / "models" / "scorer" / "train.log").exists()   # timestamps: MLflow's, not the output's
    log = _train_log(project, params)
    assert "=> resuming checkpoint" in log and "(epoch 1)" in log
    assert not list(project.glob(".winnow/work/scorer/*"))         # released once the model is out


def _train_log(project, params) -> str:
    """open_clip_train's log as the finished scorer run logged it to MLflow."""
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{project}/mlflow.db")
    exp = client.get_experiment_by_name(params["tracking"]["experiment"])
    runs = client.search_runs([exp.experiment_id], "tags.`winnow.stage` = 'scorer' and attributes.status = 'FINISHED'")
    assert len(runs) == 1
    return mlflow.artifacts.load_text(f"{runs[0].info.artifact_uri}/train.log")


def test_a_killed_plans_spill_is_swept_by_the_next_plan(demo_pool, tmp_path):
    """reshard.plan spills to the work root; a SIGKILL left hundreds of MB there at pool scale."""
    import numpy as np

    from winnow.pool import uids as U
    from winnow.pool.view import Pool
    from winnow.reshard import plan

    work = tmp_path / "work"
    script = (f"import os, sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "from winnow.pool.view import Pool\nfrom winnow.reshard import plan\nfrom winnow.pool import uids as U\n"
              "import numpy as np\n"
              f"plan(Pool.open({str(demo_pool)!r}), U.hex_to_array(np.array(['0' * 32])), spill_root={str(work)!r})\n"
              "os.kill(os.getpid(), 9)\n")                  # killed while holding the placement
    subprocess.run([sys.executable, "-c", script], env=env_for_subprocess())
    left = [p.name for p in work.iterdir()]
    assert len(left) == 1 and "winnow-plan" in left[0]
    with plan(Pool.open(str(demo_pool)), U.hex_to_array(np.array(["0" * 32])), spill_root=str(work)):
        assert left[0] not in [p.name for p in work.iterdir()]
