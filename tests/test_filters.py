import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from winnow.filters.clip_score import ClipScore, top_fraction_threshold
from winnow.filters.engine import load_recipe, run, truth_metrics
from winnow.filters.image import ImageSize
from winnow.filters.text import CaptionLength, Language, detect_languages
from winnow.pool import shards
from winnow.pool import uids as U
from winnow.pool.view import Pool


class FakeBatch:
    """A shard's metadata in memory (steps only use .arrow / .column)."""

    def __init__(self, **cols):
        self.meta = pa.table(cols)

    def arrow(self, name):
        return self.meta[name]

    def column(self, name):
        return self.meta[name].to_numpy(zero_copy_only=False)


def test_caption_length_matches_datacomp_rule():
    texts = ["a b", "a b c", "abc de f", "  lots   of   space  ", "", "zzzzzzzzzz", "tiny a b", "a\tb\nc"]
    got = CaptionLength().keep(FakeBatch(text=texts))
    want = [len(t.split()) > 2 and len(t) > 5 for t in texts]
    assert got.tolist() == want


def test_image_size_matches_datacomp_rule():
    w = np.array([200, 199, 600, 601, 300, 0])
    h = np.array([200, 400, 200, 200, 1000, 10])
    got = ImageSize().keep(FakeBatch(original_width=w, original_height=h))
    ref = [min(a, b) >= 200 and max(a, b) / max(min(a, b), 1e-9) <= 3.0 for a, b in zip(w, h)]
    assert got.tolist() == ref


def test_language_id_on_demo_captions(demo_pool):
    truth = pd.read_parquet(demo_pool / "truth.parquet")
    meta = pd.concat([shards.read_meta(str(demo_pool), s).to_pandas() for s in shards.discover(str(demo_pool))])
    df = meta.merge(truth, on="uid")
    df = df[df.kind.isin(["clean", "non_english"])]
    lang = detect_languages(df.text.tolist())
    acc_foreign = (lang[df.kind.to_numpy() == "non_english"] != "en").mean()
    acc_en = (lang[df.kind.to_numpy() == "clean"] == "en").mean()
    assert acc_foreign >= 0.95 and acc_en >= 0.95, (acc_foreign, acc_en)
    assert Language(lang="de").keep(FakeBatch(text=["ein Foto von drei roten Kreisen auf einem Hintergrund"])).all()


def test_top_fraction_is_datacomps_rule():
    rng = np.random.default_rng(0)
    s = rng.random(1001).astype(np.float32)
    for f in (0.1, 0.3, 0.5, 1.0):
        ref = -np.sort(-s)[min(int(len(s) * f), len(s) - 1)]
        assert top_fraction_threshold(s, f) == ref
    assert top_fraction_threshold(np.array([np.nan, 1.0, 0.5]), 0.5) == 0.5


def test_clip_score_top30_selects_exactly_datacomps_uids(demo_pool, tmp_path):
    pool = Pool.open(str(demo_pool))
    recipe = load_recipe("clip_b32_top30")
    run(recipe, pool, str(tmp_path))
    got = U.load(tmp_path / "uids.npy")
    meta = pd.concat([shards.read_meta(str(demo_pool), s).to_pandas() for s in pool.shards])
    scores = meta.clip_b32_similarity_score.to_numpy()
    threshold = -np.sort(-scores)[int(len(scores) * 0.3)]
    want = U.hex_to_array(meta.uid[scores >= threshold].to_numpy())
    assert (got == want).all() and len(got) == len(want)


def test_basic_funnel_and_truth(demo_pool, tmp_path):
    pool = Pool.open(str(demo_pool))
    recipe = load_recipe("basic")
    f = run(recipe, pool, str(tmp_path))
    d = pd.read_parquet(tmp_path / "decisions.parquet")
    assert f["pool_size"] == 600 == len(d)
    kept = [s["kept_after"] for s in f["steps"]]
    assert kept == sorted(kept, reverse=True) and kept[-1] == f["kept_unique"]
    assert sum(s["dropped_here"] for s in f["steps"]) == 600 - f["kept_unique"]
    assert (d.dropped_by.isna() == (d.multiplicity > 0)).all()
    tm = truth_metrics(d, pd.read_parquet(demo_pool / "truth.parquet"), recipe.labels())
    assert tm["language"]["non_english"]["recall"] >= 0.95
    assert tm["image_size"]["bad_size"]["recall"] == 1.0
    assert tm["caption_length"]["uninformative"]["recall"] >= 0.9
    assert tm["recipe"]["clean"]["recall"] <= 0.1


def test_no_filter_keeps_everything(demo_pool, tmp_path):
    f = run(load_recipe("no_filter"), Pool.open(str(demo_pool)), str(tmp_path))
    assert f["kept_unique"] == f["subset_size"] == 600


def test_missing_column_fails_before_work(demo_pool, tmp_path):
    from winnow.config import ParamsError

    with pytest.raises(ParamsError, match="scorer_score"):
        run(load_recipe("clip_score_top30"), Pool.open(str(demo_pool)), str(tmp_path))
    assert not (tmp_path / "uids.npy").exists()


def test_executors_give_identical_outputs(demo_pool, tmp_path):
    pool = Pool.open(str(demo_pool))
    for ex in ("serial", "threads", "processes"):
        run(load_recipe("basic"), pool, str(tmp_path / ex), executor=ex, workers=2)
    ref = (tmp_path / "serial" / "uids.npy").read_bytes()
    assert (tmp_path / "threads" / "uids.npy").read_bytes() == ref
    assert (tmp_path / "processes" / "uids.npy").read_bytes() == ref


def test_clip_score_needs_one_source():
    with pytest.raises(ValueError):
        ClipScore(score="a", embeddings=("x", "y"), threshold=0.1)


def test_dask_cluster_by_address_gives_identical_uids(demo_pool, tmp_path):
    """A real local multi-process dask.distributed cluster, reached by its scheduler address."""
    from distributed import LocalCluster

    pool = Pool.open(str(demo_pool))
    recipe = load_recipe("basic")
    run(recipe, pool, str(tmp_path / "serial"))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster:
        run(load_recipe("basic"), pool, str(tmp_path / "dask"), executor="dask", workers=2, address=cluster.scheduler_address)
    for name in ("uids.npy",):
        assert (tmp_path / "dask" / name).read_bytes() == (tmp_path / "serial" / name).read_bytes()
    a = pd.read_parquet(tmp_path / "serial" / "decisions.parquet")
    b = pd.read_parquet(tmp_path / "dask" / "decisions.parquet")
    pd.testing.assert_frame_equal(a, b)
