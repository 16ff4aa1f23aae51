import shutil

import numpy as np
import pandas as pd
import webdataset as wds

from winnow import models
from winnow.embed import embed_pool
from winnow.pool import shards
from winnow.pool.view import Pool
from winnow.scoring import roc_auc


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
    model, pre, tok = models.load("winnow-tiny", None)   # random weights: alignment, not quality
    pool = Pool.open(str(pool_dir))
    out = tmp_path / "embed"
    res = embed_pool(pool, model, pre, tok, str(out), batch_size=64)
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
