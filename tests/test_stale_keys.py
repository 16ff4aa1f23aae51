"""Each input a job reads is in its key: a change re-runs what depends on it and nothing else.

The cases are issue #14's: evaluation keyed by the checkpoint only; the filter keyed by embed's
meta.json, not the embeddings; the embed key missing the pool's content, the decoder and the device;
the train key missing image bytes and the model config; S3 caches comparing sizes only; a torn
results.jsonl line failing every later run."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.fixtures import evalsets as F
from tests.s3server import BUCKET
from winnow import evaluate as E
from winnow import jobs
from winnow.tasks import Suite, load_suite


@pytest.fixture(scope="module")
def tiny():
    from winnow import models

    torch.manual_seed(0)
    return models.load("winnow-tiny", None)


def _suite(*keys) -> Suite:
    full = {t.key: t for t in load_suite("datacomp38").tasks}
    return Suite(layout="datacomp", tasks=[full[k] for k in keys])


@pytest.fixture
def evaluated(tmp_path, tiny, monkeypatch):
    """evaluate(root=…, model_id=…) -> the tasks that were evaluated (not read back)."""
    root = tmp_path / "data"
    F.write_evalsets(root, hf=False)
    ran = []
    real = E.classify
    monkeypatch.setattr(E, "classify", lambda r, task, *a, **k: ran.append(task.key) or real(r, task, *a, **k))
    model, pre, tok = tiny
    suite = _suite("cifar10", "vtab/caltech101")

    def evaluate(root=root, model_id="m1"):
        ran.clear()
        rows = E.evaluate_suite(model, pre, tok, suite, str(root), str(tmp_path / "results.jsonl"), batch_size=16,
                                model_id=model_id, device="cpu", work_root=str(tmp_path / "work"))
        assert [r["status"] for r in rows] == ["ok", "ok"]
        return list(ran)

    return evaluate, root


def test_evaluation_reruns_a_task_whose_set_or_templates_changed_and_nothing_else(evaluated):
    evaluate, root = evaluated
    assert evaluate() == ["cifar10", "vtab/caltech101"]
    assert evaluate() == []                                                    # nothing changed
    tpl = root / "wds_vtab-caltech101_test" / "zeroshot_classification_templates.txt"
    tpl.write_text(tpl.read_text() + "a blurry photo of a {c}.\n")
    assert evaluate() == ["vtab/caltech101"]                                   # its templates only


def test_evaluation_reruns_everything_for_another_root_model_or_code(evaluated, tmp_path, monkeypatch):
    evaluate, root = evaluated
    evaluate()
    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved)
    assert evaluate(root=moved) == ["cifar10", "vtab/caltech101"]               # eval.data_root
    assert evaluate(root=moved) == []
    assert evaluate(root=moved, model_id="m2") == ["cifar10", "vtab/caltech101"]   # another checkpoint
    monkeypatch.setattr(jobs, "code_identity", lambda *m: "edited metrics.py")
    assert evaluate(root=moved, model_id="m2") == ["cifar10", "vtab/caltech101"]   # the code


def test_evaluation_code_key_covers_metrics_and_set_readers():
    from winnow.imports import import_closure

    closure = import_closure("winnow.evaluate")
    assert {"winnow/metrics.py", "winnow/tasks.py", "winnow/evaluate.py", "winnow/jobs.py"} <= set(closure)


def test_a_torn_results_line_does_not_fail_later_runs(evaluated, tmp_path):
    evaluate, _ = evaluated
    evaluate()
    with open(tmp_path / "results.jsonl", "a") as fh:
        fh.write('{"key": "cifar10", "status": "o')        # a run killed mid-write, or any garbage
    assert evaluate() == []
    assert [json.loads(x)["key"] for x in (tmp_path / "results.jsonl").read_text().splitlines()] == [
        "cifar10", "vtab/caltech101"]


def _interrupted_filter(monkeypatch, engine, after: int):
    """Make the filter's final pass fail after ``after`` shards, as a kill would."""
    real, seen = engine._finish, []

    def finish(*a):
        if len(seen) == after:
            raise KeyboardInterrupt("killed")
        seen.append(a[-1])
        return real(*a)

    monkeypatch.setattr(engine, "_finish", finish)


def test_filter_redoes_finished_shards_when_the_embeddings_change(demo_pool, tmp_path, monkeypatch):
    """A scorer retrain rewrites the embed stage's outputs: a resumed filter must not reuse verdicts
    decided on the old ones (the old key hashed embed's meta.json only)."""
    from winnow.filters import engine
    from winnow.pool import shards
    from winnow.pool.view import Pool

    pool_dir = tmp_path / "pool"
    shutil.copytree(demo_pool, pool_dir)
    recipe = {"name": "r", "steps": [{"step": "clip_score", "embeddings": ["b32_img", "b32_txt"], "threshold": 0.2}]}
    work, out = tmp_path / "work", tmp_path / "out"

    def run():
        return engine.run(engine.load_recipe(recipe), Pool.open(str(pool_dir)), str(out), work_root=str(work))

    with monkeypatch.context() as m:
        _interrupted_filter(m, engine, after=2)
        with pytest.raises(KeyboardInterrupt):
            run()
    assert len(list(work.glob("filter/*/_done/decisions-*.json"))) == 2

    z = shards.read_npz(str(pool_dir), "00000000")          # the retrained scorer's embeddings
    z["b32_txt"] = -z["b32_txt"]
    shards.write_npz(str(pool_dir), "00000000", z)
    decided = []
    real = engine._decide
    monkeypatch.setattr(engine, "_decide", lambda steps, fitted, batch, *a: decided.append(batch.shard) or
                        real(steps, fitted, batch, *a))
    run()
    assert decided == Pool.open(str(pool_dir)).shards          # every shard decided again
    fresh = tmp_path / "fresh"
    engine.run(engine.load_recipe(recipe), Pool.open(str(pool_dir)), str(fresh))
    assert (out / "uids.npy").read_bytes() == (fresh / "uids.npy").read_bytes()


def test_filter_resume_redoes_only_unfinished_shards(demo_pool, tmp_path, monkeypatch):
    from winnow.filters import engine
    from winnow.pool.view import Pool

    pool = Pool.open(str(demo_pool))
    work, out = tmp_path / "work", tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupted_filter(m, engine, after=1)
        with pytest.raises(KeyboardInterrupt):
            engine.run(engine.load_recipe("basic"), pool, str(out), work_root=str(work))
    decided = []
    real = engine._decide
    monkeypatch.setattr(engine, "_decide", lambda steps, fitted, batch, *a: decided.append(batch.shard) or
                        real(steps, fitted, batch, *a))
    engine.run(engine.load_recipe("basic"), pool, str(out), work_root=str(work))
    assert decided == pool.shards[1:]


def test_embed_key_covers_pool_content_decoder_device_and_weights(demo_pool, tmp_path):
    from stages.embed import work_key
    from winnow.config import Params
    from winnow.pool.view import Pool

    pool_dir = tmp_path / "pool"
    shutil.copytree(demo_pool, pool_dir)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"weights v1")
    spec = {"model": "winnow-tiny", "weights": str(weights), "name": "scorer"}
    p = Params()

    def key(params=p, device="cpu", compile_=False, encode=("img", "txt")):
        return work_key(spec, params, Pool.open(str(pool_dir)), list(encode), device, compile_).digest()

    k0 = key()
    assert key() == k0
    assert key(device="cuda:0") != k0                           # bf16 on CUDA: other numbers
    assert key(device="cpu:1") == k0                            # the device index does not matter
    assert key(compile_=True) != k0
    assert key(encode=("img", "flip", "txt")) != k0
    assert key(params=p.model_copy(update={"embed": p.embed.model_copy(update={"decode": "tensor"})})) != k0
    weights.write_bytes(b"weights v2")                          # a retrained scorer at the same path
    k1 = key()
    assert k1 != k0
    tar = pool_dir / "00000001.tar"                             # the pool's images, not just its shard names
    os.utime(tar, ns=(tar.stat().st_atime_ns, tar.stat().st_mtime_ns + 10**9))
    assert key() != k1


def test_train_key_covers_image_bytes_and_the_model_config(tmp_path, monkeypatch):
    import open_clip

    from winnow.train import work_key

    shard = tmp_path / "0.tar"
    shard.write_bytes(b"x" * 2048)
    k0 = work_key("train", ["--model", "winnow-tiny"], "winnow-tiny", str(shard)).digest()
    assert work_key("train", ["--model", "winnow-tiny"], "winnow-tiny", str(shard)).digest() == k0
    shard.write_bytes(b"y" * 2048)                              # same size, other images
    k1 = work_key("train", ["--model", "winnow-tiny"], "winnow-tiny", str(shard)).digest()
    assert k1 != k0
    real = open_clip.get_model_config
    monkeypatch.setattr(open_clip, "get_model_config",
                        lambda m: {**real(m), "embed_dim": real(m)["embed_dim"] * 2})   # configs/models edited
    assert work_key("train", ["--model", "winnow-tiny"], "winnow-tiny", str(shard)).digest() != k1


def test_s3_cache_refetches_an_object_rewritten_with_the_same_size(s3_server, tmp_path, monkeypatch):
    from winnow import s3
    from winnow.io import cache_local

    monkeypatch.chdir(tmp_path)
    bucket = BUCKET     # the server's bucket
    s3.client().put_object(Bucket=bucket, Key="set/a.txt", Body=b"version 1")
    assert (cache_local(f"s3://{bucket}/set") / "a.txt").read_bytes() == b"version 1"
    s3.client().put_object(Bucket=bucket, Key="set/a.txt", Body=b"version 2")    # same size
    assert (cache_local(f"s3://{bucket}/set") / "a.txt").read_bytes() == b"version 2"
    assert not [p for p in Path(".winnow/cache").rglob("*") if p.is_file() and p.name == "a.txt" and
                p.read_bytes() == b"version 1"]


def test_s3_scorer_weights_replaced_in_place_are_fetched_again(s3_server, tmp_path, monkeypatch):
    """The check stage saw the new ETag and DVC re-ran scorer and embed, but both loaded the cached
    old checkpoint: it was downloaded only when absent."""
    from winnow import s3
    from winnow.models import ModelError, resolve_weights

    monkeypatch.chdir(tmp_path)
    s3.client().put_object(Bucket=BUCKET, Key="w/scorer.pt", Body=b"weights v1")
    assert Path(resolve_weights(f"s3://{BUCKET}/w/scorer.pt")).read_bytes() == b"weights v1"
    s3.client().put_object(Bucket=BUCKET, Key="w/scorer.pt", Body=b"weights v2")    # same size, same key
    assert Path(resolve_weights(f"s3://{BUCKET}/w/scorer.pt")).read_bytes() == b"weights v2"
    with pytest.raises(ModelError, match="cannot be fetched: no such object"):
        resolve_weights(f"s3://{BUCKET}/w/absent.pt")


def test_an_input_folders_identity_goes_through_symlinked_folders(tmp_path):
    """A download whose shards/ is a symlink to another disk: rglob skipped it, so re-downloaded
    shards changed no identity and DVC re-ran nothing. A link cycle is walked once."""
    (tmp_path / "disk" / "shards").mkdir(parents=True)
    (tmp_path / "disk" / "shards" / "0.tar").write_bytes(b"v1")
    pool = tmp_path / "pool"
    (pool / "metadata").mkdir(parents=True)
    (pool / "metadata" / "a.parquet").write_bytes(b"m")
    (pool / "shards").symlink_to(tmp_path / "disk" / "shards")
    (tmp_path / "disk" / "shards" / "loop").symlink_to(tmp_path / "disk")      # a cycle
    before = jobs.content_identity(pool)
    assert "shards/0.tar" in [row[0] for row in before]
    (tmp_path / "disk" / "shards" / "0.tar").write_bytes(b"v2")
    assert jobs.content_identity(pool) != before
