import shutil

import numpy as np
import pandas as pd
import pytest
import webdataset as wds

from winnow import models
from winnow.embed import embed_pool
from winnow.jobs import WorkDir
from winnow.pool import shards
from winnow.pool.view import Pool
from winnow.scorer_quality import roc_auc


def corrupt_first_image(pool_dir):
    """Rewrite shard 0 with its first JPEG replaced by garbage and its second sample removed."""
    samples = list(shards.iter_tar(str(pool_dir), "00000000"))
    samples[0]["jpg"] = b"\xff\xd8\xff garbage"
    del samples[1]
    with wds.TarWriter(str(pool_dir / "00000000.tar")) as sink:
        for s in samples:
            sink.write({k: v for k, v in s.items() if v is not None})
    return samples[0]["json"]["uid"]


def test_embed_quarantines_bad_images_and_keeps_rows_aligned(demo_pool, tmp_path):
    pool_dir = tmp_path / "pool"
    shutil.copytree(demo_pool, pool_dir)
    bad_uid = corrupt_first_image(pool_dir)
    pool = Pool.open(str(pool_dir))
    work = WorkDir("embed", "test", tmp_path)
    out = work.path
    # random weights (alignment, not quality); one decode worker process
    res = embed_pool(pool, {"model": "winnow-tiny", "weights": None}, work, batch_size=64, workers=1)
    assert res[0]["corrupt_images"] == 1 and res[0]["missing_images"] == 1 and res[0]["embedded"] == 198
    df = pd.read_parquet(out / "00000000.parquet")
    meta = shards.read_meta(str(pool_dir), "00000000").to_pandas()
    assert (df.uid == meta.uid).all()   # row i <-> parquet row i
    z = shards.read_npz(str(out), "00000000")
    ok = df.image_ok.to_numpy()
    assert not ok[df.uid == bad_uid].any() and ok.sum() == 198
    assert np.isnan(z["scorer_img"][~ok]).all() and np.isfinite(z["scorer_img"][ok]).all()
    np.testing.assert_allclose(np.linalg.norm(z["scorer_img_flip"][ok], axis=1), 1, atol=1e-2)
    np.testing.assert_allclose(np.linalg.norm(z["scorer_txt"], axis=1), 1, atol=1e-2)
    # the score columns are the cosines of the stored embeddings
    np.testing.assert_allclose(df.scorer_score[ok], np.einsum("nd,nd->n", z["scorer_img"], z["scorer_txt"])[ok], atol=2e-3)


def test_roc_auc_matches_definition():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 50), rng.normal(0, 1, 60)
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert abs(roc_auc(pos, neg) - brute) < 1e-12
    assert roc_auc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5


def test_pretrained_tag_without_weights_fails_clearly():
    import pytest

    with pytest.raises(models.ModelError, match="not cached"):
        models.load("ViT-B-32", "laion2b_s34b_b79k")


def _random_checkpoint(path):
    import torch

    torch.manual_seed(0)
    model, _, _ = models.load("winnow-tiny", None)
    torch.save({"state_dict": model.state_dict()}, path)
    return {"model": "winnow-tiny", "weights": str(path)}


def _outputs(out):
    res = {}
    for p in sorted(out.glob("*.parquet")):
        res[p.name] = pd.read_parquet(p)
        for k, v in shards.read_npz(str(out), p.stem).items():
            res[f"{p.stem}:{k}"] = v
    return res


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], pd.DataFrame):
            pd.testing.assert_frame_equal(a[k], b[k])
        else:
            np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.slow   # five embed runs and a spawned pair of device processes
def test_embed_resumes_per_shard_and_splits_over_devices(demo_pool, tmp_path):
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT, env_for_subprocess, kill_when

    spec = _random_checkpoint(tmp_path / "ckpt.pt")
    pool = Pool.open(str(demo_pool))
    ref = WorkDir("embed", "ref", tmp_path)
    embed_pool(pool, spec, ref, batch_size=64, workers=0)
    reference = _outputs(ref.path)
    assert sorted(ref.finished()) == pool.shards

    # killed mid-run (SIGKILL after the first shard is marked done), then resumed
    root = tmp_path / "killed"
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "from winnow.embed import embed_pool\nfrom winnow.jobs import WorkDir\nfrom winnow.pool.view import Pool\n"
              f"embed_pool(Pool.open({str(demo_pool)!r}), {spec!r}, WorkDir('embed', 'k', {str(root)!r}), batch_size=64, workers=1)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env_for_subprocess())
    out = root / "embed" / "k"
    kill_when(proc, lambda: list(out.glob("_done/*.json")), poll=0.02)
    finished = {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    marked = [n[len("_done/"):-len(".json")] for n in finished if n.startswith("_done/")]
    assert 1 <= len(marked) < 3, "killed too late"
    res = embed_pool(pool, spec, WorkDir("embed", "k", root), batch_size=64, workers=0)
    assert [r["shard"] for r in res] == pool.shards
    for stem in marked:                              # finished shards were not recomputed
        for name in (f"{stem}.npz", f"{stem}.parquet", f"_done/{stem}.json"):
            assert (out / name).stat().st_mtime_ns == finished[name]
    _same(_outputs(out), reference)                  # identical to the uninterrupted run

    # a partial shard (outputs without its marker) is redone
    os.remove(ref.path / "_done" / "00000001.json")
    (ref.path / "00000001.npz").write_bytes(b"half written")
    embed_pool(pool, spec, ref, batch_size=64, workers=0)
    _same(_outputs(ref.path), reference)

    # two device processes (cpu, cpu), each every 2nd shard: the same outputs
    split = WorkDir("embed", "split", tmp_path / "split")
    embed_pool(pool, spec, split, batch_size=64, workers=0, devices=["cpu", "cpu"])
    _same(_outputs(split.path), reference)


def test_embedding_names_follow_datacomp_for_its_models(tmp_path):
    import pytest

    assert models.embedding_name("ViT-L-14", "openai") == "l14"
    assert models.embedding_name("ViT-B-32", "openai") == "b32"
    assert models.embedding_name("winnow-tiny", None) == "scorer"
    assert models.embedding_name("ViT-B-16", "laion2b_s34b_b88k") == "vit_b_16_laion2b_s34b_b88k"
    assert models.embedding_name("winnow-tiny", "/ckpts/dfn-v1.pt") == "winnow_tiny_dfn_v1"
    assert models.embedding_name("ViT-L-14", "openai", "mine") == "mine"
    with pytest.raises(models.ModelError):
        models.embedding_name("ViT-L-14", "openai", "Bad-Name")
    # a local checkpoint path is a valid scorer: it loads with its weights
    spec = _random_checkpoint(tmp_path / "dfn-v1.pt")
    m, _, _ = models.load(spec["model"], spec["weights"])
    import torch
    ref = torch.load(spec["weights"], weights_only=True)["state_dict"]
    assert all(torch.equal(v, ref[k]) for k, v in m.state_dict().items())


def test_tensor_decode_matches_pil_and_quarantines_the_same(demo_pool, tmp_path):
    pool_dir = tmp_path / "pool"
    shutil.copytree(demo_pool, pool_dir)
    bad_uid = corrupt_first_image(pool_dir)
    spec = _random_checkpoint(tmp_path / "ckpt.pt")
    pool = Pool.open(str(pool_dir))
    a = embed_pool(pool, spec, WorkDir("pil", "t", tmp_path), batch_size=64, workers=0)
    b = embed_pool(pool, spec, WorkDir("tensor", "t", tmp_path), batch_size=64, workers=0, decode="tensor")
    assert [r["corrupt_images"] for r in a] == [r["corrupt_images"] for r in b] == [1, 0, 0]
    assert b[0]["corrupt_uids"] == [bad_uid] and b[0]["missing_images"] == 1
    za, zb = shards.read_npz(str(tmp_path / "pil" / "t"), "00000000"), shards.read_npz(str(tmp_path / "tensor" / "t"), "00000000")
    ok = np.isfinite(za["scorer_img"][:, 0])
    assert (ok == np.isfinite(zb["scorer_img"][:, 0])).all()
    for k in ("scorer_img", "scorer_img_flip"):   # same images up to resampling: nearly parallel embeddings
        cos = np.einsum("nd,nd->n", za[k][ok], zb[k][ok])
        assert cos.min() > 0.97, (k, cos.min())
    np.testing.assert_array_equal(za["scorer_txt"], zb["scorer_txt"])


def test_alignment_targets_stream_from_train_splits_and_class_prompts(tmp_path):
    """Targets: task train images (streamed in batches, never all held) and class-name prompts; a
    real DataComp evaluation root has test splits only, so its targets are the class prompts."""
    from tests.fixtures.evalsets import write_evalsets
    from winnow import models
    from winnow.embed import embed_targets
    from winnow.demo.tasks import generate_task
    from winnow.tasks import load_suite

    model, pre, tok = models.load("winnow-tiny", None)
    demo = load_suite("demo")
    for task in demo.tasks:
        generate_task(task, str(tmp_path / "tasks"), 0, n_test=4, n_train=10)
    counts = embed_targets(demo, str(tmp_path / "tasks"), model, pre, tok, str(tmp_path / "a"), batch_size=4)
    z = np.load(tmp_path / "a" / "targets.npz")
    assert counts["shapes"] == {"img": 10, "txt": 48} and z["img:shapes"].shape[0] == 10
    assert counts["retrieval"] == {"img": 10, "txt": 20}          # 2 captions per train image
    assert np.allclose(np.linalg.norm(z["img:counting"].astype(np.float32), axis=1), 1, atol=1e-2)
    write_evalsets(tmp_path / "dc", hf=False)
    counts = embed_targets(load_suite("datacomp38"), str(tmp_path / "dc"), model, pre, tok, str(tmp_path / "b"))
    names = (tmp_path / "dc" / "wds_cifar10_test" / "classnames.txt").read_text().split()
    assert counts["cifar10"] == {"txt": len(names)} and counts["imagenet1k"] == {}
