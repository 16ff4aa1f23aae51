"""The steps beyond DataComp's basic rules: text regex, exact dedup, flip rule, retrieval,
image clusters, rebalancing; recipe overrides; determinism across executors."""
import numpy as np
import pandas as pd
import pytest
import yaml

from winnow.executor import Executor
from winnow.config import ParamsError
from winnow.filters.engine import load_recipe, recipe_names, run
from winnow.pool import shards
from winnow.pool import uids as U
from winnow.pool.view import Pool


def recipe(tmp_path, steps, name="t"):
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"name": name, "steps": steps}))
    return load_recipe(str(p))


@pytest.fixture(scope="module")
def pool_with_targets(demo_pool, tmp_path_factory):
    """The demo pool + an embed dir whose targets are copies of 5 pool images (b32) and 3 texts."""
    embed = tmp_path_factory.mktemp("embed")
    z = shards.read_npz(str(demo_pool), "00000001")
    np.savez(embed / "targets.npz", **{"img:t": z["b32_img"][[0, 10, 20, 30, 40]].astype(np.float16),
                                       "txt:t": z["b32_txt"][[1, 2, 3]].astype(np.float16)})
    meta = shards.read_meta(str(demo_pool), "00000001").to_pandas()
    return Pool.open(str(demo_pool), embed_uri=str(embed)), meta.uid.to_numpy()


def decisions(tmp_path):
    return pd.read_parquet(tmp_path / "decisions.parquet")


def test_text_regex_drops_file_names(demo_pool, tmp_path):
    r = load_recipe("devil_in_details")
    step = r.steps[r.labels().index("uninformative")]
    class B:
        def __init__(self, texts):
            import pyarrow as pa
            self.meta = pa.table({"text": texts})

        def arrow(self, name):
            return self.meta[name]
    texts = ["IMG_2041.jpg", "image", "DSC00123.JPG", "untitled-77", "photo", "123.png",
             "a photo of two red circles", "image of a red square on white"]
    assert step.verdict(B(texts)).tolist() == [False] * 6 + [True, True]


def test_dedup_exact_keeps_first_of_each_image(demo_pool, tmp_path):
    run(recipe(tmp_path, [{"step": "dedup_exact"}]), Pool.open(str(demo_pool)), str(tmp_path))
    d = decisions(tmp_path)
    meta = pd.concat([shards.read_meta(str(demo_pool), s).to_pandas() for s in shards.discover(str(demo_pool))])
    kept = meta[d["keep:dedup_exact"].to_numpy()]
    assert kept.sha256.is_unique and kept.sha256.nunique() == meta.sha256.nunique()
    first = ~meta.sha256.duplicated(keep="first").to_numpy()
    assert (d["keep:dedup_exact"].to_numpy() == first).all()


def test_flip_rule_modes(tmp_path):
    from winnow.filters.clip_score import FlipScore

    class B:
        def column(self, name):
            return {"s": np.array([0.8, 0.8, 0.3, np.nan]), "f": np.array([0.75, 0.3, 0.3, 0.5])}[name]
    assert FlipScore(score="s", flip_score="f", mode="drop", max_drop=0.1).verdict(B()).tolist() == [True, False, True, False]
    assert FlipScore(score="s", flip_score="f", mode="flipped", threshold=0.5).verdict(B()).tolist() == [True, False, False, False]
    assert FlipScore(score="s", flip_score="f", mode="min", threshold=0.3).verdict(B()).tolist() == [True, True, True, False]
    with pytest.raises(Exception, match="max_drop"):
        FlipScore(mode="drop")


def test_retrieval_finds_the_samples_the_targets_copy(pool_with_targets, tmp_path):
    pool, uids = pool_with_targets
    r = recipe(tmp_path, [{"step": "retrieval", "key": "b32_img", "queries": ["image"], "k": 1}])
    f = run(r, pool, str(tmp_path))
    got = set(U.array_to_hex(U.load(tmp_path / "uids.npy")))
    assert got == set(uids[[0, 10, 20, 30, 40]]) and f["steps"][0]["state"]["queries"] == 5


def test_retrieval_upsample_emits_multiplicities(pool_with_targets, tmp_path):
    pool, uids = pool_with_targets
    r = recipe(tmp_path, [{"step": "retrieval", "key": "b32_img", "queries": ["image", "text"], "k": 2,
                           "mode": "upsample", "factor": 3}])
    f = run(r, pool, str(tmp_path))
    d = decisions(tmp_path)
    assert set(d.multiplicity) == {1, 3} and f["kept_unique"] == 600
    assert f["subset_size"] == 600 + 2 * int((d.multiplicity == 3).sum())
    ids = U.load(tmp_path / "uids.npy")
    assert U.multiplicity(ids, U.hex_to_array(uids[[0]], sort=False))[0] == 3


def test_image_clusters_keep_target_clusters(pool_with_targets, tmp_path):
    pool, _ = pool_with_targets
    r = recipe(tmp_path, [{"step": "image_clusters", "key": "b32_img", "clusters": 12, "tasks": ["t"]}])
    f = run(r, pool, str(tmp_path))
    st = f["steps"][0]["state"]
    assert st["clusters"] == 12 and 1 <= st["target_clusters"] <= 5
    assert 0 < f["kept_unique"] < 600
    assert decisions(tmp_path)["keep:image_clusters"].to_numpy()[200 + 0]   # a target's own sample


def test_rebalance_caps_and_repeats_deterministically(demo_pool, tmp_path):
    pool = Pool.open(str(demo_pool))
    steps = [{"step": "rebalance", "key": "b32_img", "clusters": 10, "cap": 0.8, "max_repeat": 3}]
    outs = []
    for ex in ("serial", "processes"):
        from winnow.filters.engine import run as run_
        f = run_(recipe(tmp_path, steps), pool, str(tmp_path / ex), executor=Executor(ex, 2))
        outs.append((tmp_path / ex / "uids.npy").read_bytes())
    assert outs[0] == outs[1]
    st = f["steps"][0]["state"]
    assert st["capped_clusters"] >= 1 and st["upsampled_clusters"] >= 1
    m = pd.read_parquet(tmp_path / "serial" / "decisions.parquet").multiplicity
    assert m.max() <= 3 and (m == 0).any() and (m > 1).any()


def test_overrides_change_step_fields_and_are_validated():
    r = load_recipe("clip_score_top30", {"clip_score": {"fraction": 0.2}})
    assert r.steps[0].fraction == 0.2
    with pytest.raises(ParamsError, match="no step 'clip'"):
        load_recipe("clip_score_top30", {"clip": {"fraction": 0.2}})
    with pytest.raises(ParamsError, match="did you mean 'fraction'"):
        load_recipe("clip_score_top30", {"clip_score": {"fractio": 0.2}})


def test_every_named_recipe_validates():
    names = recipe_names()
    for need in ("no_filter", "basic", "laion2b", "clip_score_top30", "clip_b32_top30", "clip_l14_top30",
                 "image_based", "image_based_x_clip", "devil_in_details", "text_based"):
        assert need in names
    for n in names:
        assert load_recipe(n).name == n


def test_missing_targets_fail_clearly(demo_pool, tmp_path):
    r = recipe(tmp_path, [{"step": "retrieval", "key": "b32_img"}])
    with pytest.raises(ParamsError, match="target embeddings"):
        run(r, Pool.open(str(demo_pool)), str(tmp_path))


def test_corrupt_shard_fails_naming_it_or_is_quarantined(demo_pool, tmp_path):
    import shutil

    from winnow.pool.shards import ShardError

    bad = tmp_path / "pool"
    shutil.copytree(demo_pool, bad)
    (bad / "00000001.npz").write_bytes(b"PK\x03\x04 this is not a zip")
    steps = [{"step": "clip_score", "embeddings": ["b32_img", "b32_txt"], "fraction": 0.3}]
    with pytest.raises(ShardError, match="00000001"):
        run(recipe(tmp_path, steps), Pool.open(str(bad)), str(tmp_path / "a"))
    p = tmp_path / "q.yaml"
    p.write_text(yaml.safe_dump({"name": "q", "corrupt_shards": "quarantine", "steps": steps}))
    f = run(load_recipe(str(p)), Pool.open(str(bad)), str(tmp_path / "b"))
    assert [q["shard"] for q in f["quarantined_shards"]] == ["00000001"]
    assert f["pool_size"] == 400 and f["kept_unique"] == 121   # rank int(0.3 N) is kept too (>=)


def test_a_verified_pool_is_trusted_only_while_its_files_are_unchanged(demo_pool, tmp_path, monkeypatch):
    """The pool gate's record (winnow.pool.verified) lets the filter's probe skip re-reading every
    shard's uids; a shard changed since (here its uid pages overwritten) is no longer the file the
    gate read, so the probe reads it again and finds it corrupt."""
    import shutil

    from winnow.pool import verified

    monkeypatch.chdir(tmp_path)
    pool_dir = tmp_path / "pool"
    shutil.copytree(demo_pool, pool_dir)
    verified.record(Pool.open(str(pool_dir)))
    assert verified.is_verified(Pool.open(str(pool_dir)))
    path = pool_dir / "00000001.parquet"
    data = bytearray(path.read_bytes())
    data[8:4000] = b"\xff" * 3992          # the first column chunk (uid); the footer stays readable
    path.write_bytes(bytes(data))
    assert not verified.is_verified(Pool.open(str(pool_dir)))
    steps = [{"step": "clip_score", "embeddings": ["b32_img", "b32_txt"], "fraction": 0.3}]
    p = tmp_path / "q.yaml"
    p.write_text(yaml.safe_dump({"name": "q", "corrupt_shards": "quarantine", "steps": steps}))
    f = run(load_recipe(str(p)), Pool.open(str(pool_dir)), str(tmp_path / "b"))
    assert [q["shard"] for q in f["quarantined_shards"]] == ["00000001"]


def test_faiss_kmeans_is_datacomps_clustering(demo_pool, tmp_path):
    """``kmeans: faiss`` clusters as DataComp's image_based_clustering.train_kmeans does (its CPU
    form: faiss.Clustering with niter 20, the seed, no sub-sampling, an L2 flat index), keeping the
    centroids as DataComp stores them; and image_clusters runs on it end to end."""
    import faiss

    from winnow.filters.alignment import _kmeans

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.05, (200, 8)) for c in np.eye(8)[:4]]).astype(np.float32)
    ref = faiss.Clustering(8, 4)
    ref.niter, ref.seed, ref.max_points_per_centroid = 20, 3, 10_000_000
    ref.train(x, faiss.IndexFlatL2(8))
    want = faiss.vector_float_to_array(ref.centroids).reshape(4, 8)
    got = _kmeans(x, 4, 3, "faiss")
    assert np.array_equal(got, want)
    nearest = ((x[:, None, :] - got[None]) ** 2).sum(-1).argmin(1)      # L2 k-means' fixed point
    from winnow.filters.alignment import _assign

    assert np.array_equal(_assign(x, got, l2=True), nearest)   # rebalance counts faiss clusters in this partition
    for c in np.unique(nearest):
        assert np.allclose(got[c], x[nearest == c].mean(0), atol=1e-4)
    steps = [{"step": "image_clusters", "key": "b32_img", "clusters": 5, "kmeans": "faiss"}]
    targets = tmp_path / "targets.npy"
    np.save(targets, np.load(demo_pool / "00000000.npz")["b32_img"][:3].astype(np.float32))
    r = recipe(tmp_path, steps)
    r.targets = {"imagenet1k": str(targets)}
    f = run(r, Pool.open(str(demo_pool)), str(tmp_path / "out"))
    assert 0 < f["kept_unique"] < f["pool_size"] and f["steps"][0]["state"]["clusters"] == 5


def test_flip_drop_quantile_is_an_exact_rank_rule(demo_pool, tmp_path):
    """``max_drop_quantile: q`` keeps the samples whose drop (score - flipped score) is at most the
    value at descending rank int(N(1-q)) of the drops it decides: a rule in the scorer's own units.
    The pool's two metadata scores stand in for a score and its flipped-image score."""
    from winnow.filters.clip_score import top_fraction_threshold

    meta = pd.concat([shards.read_meta(str(demo_pool), s).to_pandas() for s in shards.discover(str(demo_pool))])
    drop = (meta.clip_l14_similarity_score.to_numpy(np.float32) - meta.clip_b32_similarity_score.to_numpy(np.float32))
    steps = [{"step": "flip_score", "score": "clip_l14_similarity_score", "flip_score": "clip_b32_similarity_score",
              "max_drop_quantile": 0.8}]
    f = run(recipe(tmp_path, steps), Pool.open(str(demo_pool)), str(tmp_path / "out"))
    want = top_fraction_threshold(drop, 1 - 0.8)
    assert f["steps"][0]["state"]["max_drop"] == want
    assert f["kept_unique"] == int((drop <= want).sum()) and 0.75 * len(drop) <= f["kept_unique"] <= 0.85 * len(drop)
    with pytest.raises(ParamsError, match="exactly one of 'max_drop', 'max_drop_quantile' or 'max_drop_mirror'"):
        load_recipe({"name": "r", "steps": [{"step": "flip_score", "max_drop": 0.1, "max_drop_quantile": 0.9}]})


def _with_flip_drops(demo_pool, out, text_share: float, seed: int = 0):
    """A copy of the demo pool whose two metadata scores stand in for a score and its flipped-image
    score: a share ``text_share`` of the rows are text pairs (they lose 0.05-0.2 on flipping), the
    others clean (their drops symmetric about 0, sd 0.01). Returns the text pairs' uids."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(demo_pool, out)
    rng = np.random.default_rng(seed)
    text = []
    for stem in shards.discover(str(out)):
        t = pq.read_table(out / f"{stem}.parquet")
        n = t.num_rows
        is_text = rng.random(n) < text_share
        score = rng.uniform(0.2, 0.4, n)
        drop = np.where(is_text, rng.uniform(0.05, 0.2, n), rng.normal(0, 0.01, n))
        t = t.set_column(t.schema.get_field_index("clip_l14_similarity_score"), "clip_l14_similarity_score",
                         pa.array(score, pa.float32()))
        t = t.set_column(t.schema.get_field_index("clip_b32_similarity_score"), "clip_b32_similarity_score",
                         pa.array(score - drop, pa.float32()))
        pq.write_table(t, out / f"{stem}.parquet")
        text += t.column("uid").to_numpy(zero_copy_only=False)[is_text].tolist()
    return set(text)


@pytest.mark.parametrize("text_share", [0.1, 0.5])
def test_flip_drop_mirror_takes_out_text_pairs_however_many_there_are(demo_pool, tmp_path, text_share):
    """``max_drop_mirror: r`` keeps a drop up to the rise that a share r of the samples exceed:
    only clean pairs rise, and their drops mirror their rises, so text pairs go whether they are a
    tenth or half of what the step decides, and few clean pairs do. A quantile of all drops
    (``max_drop_quantile: 0.85``) takes out 15% of the samples, however many text pairs there are."""
    from winnow.filters.clip_score import top_fraction_threshold

    pool_dir = tmp_path / "pool"
    text = _with_flip_drops(demo_pool, pool_dir, text_share)
    meta = pd.concat([shards.read_meta(str(pool_dir), s).to_pandas() for s in shards.discover(str(pool_dir))])
    drop = meta.clip_l14_similarity_score.to_numpy(np.float32) - meta.clip_b32_similarity_score.to_numpy(np.float32)
    flip = {"step": "flip_score", "score": "clip_l14_similarity_score", "flip_score": "clip_b32_similarity_score"}
    kept = {}
    for rule in ({"max_drop_mirror": 0.02}, {"max_drop_quantile": 0.85}):
        name = next(iter(rule))
        f = run(recipe(tmp_path, [flip | rule], name=name), Pool.open(str(pool_dir)), str(tmp_path / name))
        kept[name] = set(U.array_to_hex(U.load(tmp_path / name / "uids.npy")).tolist())
        if name == "max_drop_mirror":
            want = top_fraction_threshold(-drop, 0.02)            # the rise at descending rank int(0.02 N)
            assert f["steps"][0]["state"]["max_drop"] == pytest.approx(want, abs=1e-7)
            assert kept[name] == set(meta.uid[drop <= want])
    clean = set(meta.uid) - text
    mirror = kept["max_drop_mirror"]
    assert not mirror & text, "every text pair goes"
    assert len(clean - mirror) <= 0.05 * len(clean), "few clean pairs go"
    quantile = kept["max_drop_quantile"]
    if text_share > 0.15:
        assert len(quantile & text) > 0.5 * len(text), "a quantile of all drops leaves most text pairs"
    with pytest.raises(ParamsError, match="exactly one of 'max_drop', 'max_drop_quantile' or 'max_drop_mirror'"):
        load_recipe({"name": "r", "steps": [{"step": "flip_score", "max_drop_quantile": 0.9, "max_drop_mirror": 0.01}]})
    with pytest.raises(ParamsError, match="max_drop_mirror"):
        load_recipe({"name": "r", "steps": [{"step": "flip_score", "max_drop_mirror": 0.5}]})


@pytest.mark.parametrize("mode", ["min", "flipped"])
def test_flip_fraction_keeps_the_top_of_the_min_or_flipped_score(demo_pool, tmp_path, mode):
    """``mode: min`` / ``flipped`` with ``fraction: f`` keeps the top f of the samples it decides by
    min(score, flipped score) / the flipped score, exactly DataComp's top-fraction rule on that
    value. The pool's two metadata scores stand in for a score and its flipped-image score."""
    from winnow.filters.clip_score import top_fraction_threshold

    meta = pd.concat([shards.read_meta(str(demo_pool), s).to_pandas() for s in shards.discover(str(demo_pool))])
    s = meta.clip_l14_similarity_score.to_numpy(np.float32)
    fl = meta.clip_b32_similarity_score.to_numpy(np.float32)
    v = np.minimum(s, fl) if mode == "min" else fl
    steps = [{"step": "flip_score", "score": "clip_l14_similarity_score", "flip_score": "clip_b32_similarity_score",
              "mode": mode, "fraction": 0.4}]
    f = run(recipe(tmp_path, steps), Pool.open(str(demo_pool)), str(tmp_path / "out"))
    want = top_fraction_threshold(v, 0.4)
    assert f["steps"][0]["state"]["threshold"] == want
    assert f["kept_unique"] == int((v >= want).sum()) and 0.35 * len(v) <= f["kept_unique"] <= 0.45 * len(v)
    for bad in ({"mode": mode}, {"mode": mode, "threshold": 0.2, "fraction": 0.4},
                {"mode": mode, "fraction": 0.4, "max_drop": 0.1}, {"max_drop": 0.1, "fraction": 0.4}):
        with pytest.raises(ParamsError, match="exactly one of|takes"):
            load_recipe({"name": "r", "steps": [{"step": "flip_score"} | bad]})
