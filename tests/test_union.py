"""``any_of`` (a union of step chains) and rebalancing that counts earlier copies."""
import numpy as np
import pandas as pd
import pytest

from tests.test_steps import pool_with_targets, recipe  # noqa: F401  (fixture)
from winnow.config import ParamsError
from winnow.executor import Executor
from winnow.filters.engine import load_recipe, run
from winnow.pool import shards
from winnow.pool import uids as U


def _kept(path) -> list[str]:
    return sorted(U.array_to_hex(U.load(path / "uids.npy")))


def _meta(pool) -> pd.DataFrame:
    return pd.concat([shards.read_meta(pool.uri, s).to_pandas() for s in pool.shards], ignore_index=True)


QUALITY = {"name": "quality", "steps": [{"step": "caption_length", "min_words": 3, "min_chars": 6},
                                        {"step": "clip_score", "score": "clip_b32_similarity_score", "threshold": 0.3}]}
TASK = {"name": "task", "steps": [{"step": "retrieval", "key": "b32_img", "queries": ["image"], "k": 1, "mode": "keep"}]}


def test_any_of_keeps_the_union_of_its_branches(pool_with_targets, tmp_path):
    pool, uids = pool_with_targets
    meta = _meta(pool)
    f = run(recipe(tmp_path, [{"step": "any_of", "branches": [QUALITY, TASK]}]), pool, str(tmp_path))
    quality = set(meta.uid[(meta.text.str.split().str.len() >= 3) & (meta.text.str.len() >= 6)
                           & (meta.clip_b32_similarity_score >= 0.3)])
    retrieved = set(uids[[0, 10, 20, 30, 40]])      # the targets copy these pool images
    assert retrieved - quality, "the fixture must retrieve something the quality branch drops"
    assert set(_kept(tmp_path)) == quality | retrieved
    d = pd.read_parquet(tmp_path / "decisions.parquet")
    assert set(d.uid[d["branch.task:any_of"] > 0]) == retrieved
    assert f["kept_unique"] == len(quality | retrieved)
    assert f["steps"][0]["state"]["branches"]["task"]["steps"]["retrieval"]["retrieved"] == 5


def test_a_branch_selects_from_a_named_steps_survivors(pool_with_targets, tmp_path):
    pool, uids = pool_with_targets
    meta = _meta(pool).set_index("uid")
    short = uids[[0, 10, 20, 30, 40]]
    # from: caption_length -> retrieval only sees what the quality branch's caption check kept
    task = TASK | {"from": "caption_length"}
    run(recipe(tmp_path, [{"step": "any_of", "branches": [QUALITY, task]}]), pool, str(tmp_path))
    d = pd.read_parquet(tmp_path / "decisions.parquet").set_index("uid")
    task_kept = set(d.index[d["branch.task:any_of"] > 0])
    ok_caption = (meta.text.str.split().str.len() >= 3) & (meta.text.str.len() >= 6)
    assert task_kept <= set(meta.index[ok_caption])
    assert set(s for s in short if ok_caption[s]) <= task_kept


def test_any_of_after_steps_decides_only_what_reached_it_and_gives_the_most_copies(pool_with_targets, tmp_path):
    pool, uids = pool_with_targets
    up = {"name": "task", "steps": [{"step": "retrieval", "key": "b32_img", "queries": ["image"], "k": 1,
                                     "mode": "upsample", "factor": 3}]}
    steps = [{"step": "image_size", "min_side": 200, "max_aspect": 3.0}, {"step": "any_of", "branches": [QUALITY, up]}]
    outs = {}
    for ex in ("serial", "processes"):
        for decide in ("survivors", "all"):
            out = tmp_path / f"{ex}-{decide}"
            run(recipe(tmp_path, steps), pool, str(out), executor=Executor(ex, 2), decide=decide)
            outs[(ex, decide)] = (out / "uids.npy").read_bytes()
    assert len(set(outs.values())) == 1, "every executor and decide mode keeps the same copies"
    d = pd.read_parquet(tmp_path / "serial-survivors" / "decisions.parquet")
    size_ok = d["keep:image_size"].fillna(False).astype(bool)
    # upsample keeps every sample it sees (once, or 3x if retrieved): the union is what image_size kept
    assert (d.multiplicity[size_ok] >= 1).all() and (d.multiplicity[~size_ok] == 0).all()
    assert set(d.multiplicity[size_ok]) == {1, 3}


def test_a_global_step_in_a_branch_fits_on_that_branchs_input(pool_with_targets, tmp_path):
    pool, _ = pool_with_targets
    meta = _meta(pool)
    top = {"name": "top", "steps": [{"step": "caption_length", "min_words": 3, "min_chars": 6},
                                    {"step": "clip_score", "score": "clip_b32_similarity_score", "fraction": 0.5,
                                     "over": "survivors"}]}
    f = run(recipe(tmp_path, [{"step": "any_of", "branches": [top, TASK]}]), pool, str(tmp_path))
    from winnow.filters.clip_score import top_fraction_threshold

    ok = (meta.text.str.split().str.len() >= 3) & (meta.text.str.len() >= 6)
    want = top_fraction_threshold(meta.clip_b32_similarity_score[ok].to_numpy(np.float32), 0.5)
    got = f["steps"][0]["state"]["branches"]["top"]["steps"]["clip_score"]["threshold"]
    assert got == pytest.approx(want)


@pytest.mark.parametrize("branches, match", [
    ([QUALITY], "at least 2"),
    ([QUALITY, TASK | {"from": "nowhere"}], "not a step of an earlier branch"),
    ([QUALITY, QUALITY], "branch names must differ"),
    ([QUALITY, {"name": "b", "steps": [{"step": "rebalance", "key": "b32_img"}]}], "cannot run inside any_of"),
    ([QUALITY, {"name": "b", "steps": [{"step": "clip_scor", "score": "x", "threshold": 0}]}], "unknown step 'clip_scor'"),
    ([QUALITY, {"name": "b", "steps": [{"step": "caption_length", "min_words": 3}]}], "repeat an earlier branch"),
])
def test_bad_any_of_fails_before_any_data_is_read(tmp_path, branches, match):
    with pytest.raises(ParamsError, match=match):
        recipe(tmp_path, [{"step": "any_of", "branches": branches}])


def test_the_work_key_tells_branch_step_kinds_apart(tmp_path):
    a = recipe(tmp_path, [{"step": "any_of", "branches": [QUALITY, TASK]}]).steps[0].model_dump(mode="json")
    kinds = [s["step"] for b in a["branches"] for s in b["steps"]]
    assert kinds == ["caption_length", "clip_score", "retrieval"]


def test_rebalance_scales_copies_instead_of_dropping_retrieved_samples():
    from winnow.filters.alignment import Clusters, Rebalance

    class B:
        shard = "s"
        def __init__(self, n):
            self.n = n
        def __len__(self):
            return self.n
        def embedding(self, key):
            return np.tile(np.array([[1.0, 0.0]], np.float32), (self.n, 1))
        def column(self, name):
            import pyarrow as pa
            return pa.array([f"{i:032x}" for i in range(1, self.n + 1)])
    step = Rebalance(key="e", clusters=1)
    fitted = Clusters(centroids=np.array([[1.0, 0.0]], np.float32), keep_rate=np.array([0.5]),
                      repeat=np.array([1]))
    copies = np.array([2] * 6 + [1] * 6)
    v = step.verdict(B(12), fitted, copies)
    assert (v[:6] == 1).all(), "a sample with 2 copies in a half-rate cluster keeps exactly one"
    assert set(v[6:]) <= {0, 1}
    # counts weigh each sample by its copies
    parts = step.fit_shard(B(4), np.array([3, 0, 1, 2]), 2, fitted)
    assert parts.tolist() == [6]


def test_rebalance_after_upsampling_counts_the_copies(pool_with_targets, tmp_path):
    pool, uids = pool_with_targets
    up = {"step": "retrieval", "key": "b32_img", "queries": ["image", "text"], "k": 40, "mode": "upsample", "factor": 4}
    reb = {"step": "rebalance", "key": "b32_img", "clusters": 6, "cap": 1.0, "max_repeat": 1}
    run(recipe(tmp_path, [up]), pool, str(tmp_path / "up"))
    run(recipe(tmp_path, [up, reb]), pool, str(tmp_path / "both"))
    before = pd.read_parquet(tmp_path / "up" / "decisions.parquet").multiplicity.to_numpy()
    after = pd.read_parquet(tmp_path / "both" / "decisions.parquet").multiplicity.to_numpy()
    assert (after <= before).all() and (before > 1).any()
    # a retrieved sample is thinned copy by copy: with cap 1 and no repeats it keeps at least
    # floor(4 x its cluster's rate) copies, and since the rates are computed on copies, some
    # retrieved samples keep more than one (a count of samples would have kept 0 or 4)
    assert set(np.unique(after[before == 4])) - {0, 4}


def test_the_shipped_devil_in_details_runs_its_union_and_rebalance(demo_pool, tmp_path):
    """The paper's recipe as shipped, on the micro pool with an embed stage's outputs stood in by the
    pool's own b32 features (score: their cosine; flipped score: lower for scene text, as a reading
    scorer's): every stage-1 step, the union and rebalance decide, and the same copies on every
    executor."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from winnow.pool.view import Pool

    embed = tmp_path / "embed"
    embed.mkdir()
    truth = pd.read_parquet(demo_pool / "truth.parquet").set_index("uid")
    first = None
    for s in shards.discover(str(demo_pool)):
        z = shards.read_npz(str(demo_pool), s)
        img, txt = z["b32_img"].astype(np.float32), z["b32_txt"].astype(np.float32)
        uid = shards.read_meta(str(demo_pool), s).column("uid").to_pylist()
        score = (img * txt).sum(1)
        flip = score - np.where(truth.loc[uid, "kind"].to_numpy() == "scene_text", 0.3, 0.0)
        pq.write_table(pa.table({"uid": uid, "scorer_score": score, "scorer_flip_score": flip,
                                 "image_ok": np.ones(len(uid), bool)}), embed / f"{s}.parquet")
        np.savez(embed / f"{s}.npz", scorer_img=img, scorer_img_flip=img, scorer_txt=txt)
        first = img if first is None else first
    np.savez(embed / "targets.npz", **{"img:shapes": first[:20].astype(np.float16), "txt:shapes": first[20:30].astype(np.float16)})
    pool = Pool.open(str(demo_pool), embed_uri=str(embed))
    outs = {}
    for ex in ("serial", "processes"):
        f = run(load_recipe("devil_in_details"), pool, str(tmp_path / ex), executor=Executor(ex, 2))
        outs[ex] = (tmp_path / ex / "uids.npy").read_bytes()
    assert outs["serial"] == outs["processes"]
    steps = {s["step"]: s for s in f["steps"]}
    assert list(steps) == ["image_size", "caption_length", "uninformative", "language", "dedup_exact", "aligned", "rebalance"]
    union = steps["aligned"]["state"]["branches"]
    assert union["task"]["steps"]["retrieval"]["retrieved"] > 0 and "max_drop" in union["cross_modal"]["steps"]["flip_score"]
    d = pd.read_parquet(tmp_path / "serial" / "decisions.parquet")
    cross, task = d["branch.cross_modal:aligned"] > 0, d["branch.task:aligned"] > 0
    reached = d["keep:dedup_exact"].fillna(False).astype(bool)
    assert (task & ~cross & reached).any(), "retrieval adds samples the cross-modal branch dropped"
    kept = d.multiplicity > 0
    assert (d["keep:aligned"].fillna(False).astype(bool) == (reached & (cross | task))).all()
    assert not (kept & truth.loc[d.uid, "kind"].isin(["bad_size", "non_english", "uninformative"]).to_numpy()).any()


def test_a_top_fraction_that_nothing_reaches_keeps_nothing_and_an_empty_branch_spares_the_union(demo_pool, tmp_path):
    """A top-fraction or quantile cut after a step that kept nothing raised a bare ValueError ("no
    finite scores"), failing the run, and one empty branch failed a whole any_of."""
    from winnow.pool.view import Pool

    pool = Pool.open(str(demo_pool))
    nothing = {"step": "caption_length", "min_words": 500}
    cut = {"step": "clip_score", "score": "clip_b32_similarity_score", "fraction": 0.3, "over": "survivors"}
    flip = {"step": "flip_score", "score": "clip_b32_similarity_score", "flip_score": "clip_l14_similarity_score",
            "max_drop_quantile": 0.9}
    for decide in ("survivors", "all"):
        for step in (cut, flip):
            f = run(load_recipe({"name": "empty", "steps": [nothing, step]}), pool, str(tmp_path / f"{decide}-{step['step']}"),
                    decide=decide)
            assert f["kept_unique"] == 0
            assert next(iter(f["steps"][-1]["state"].values())) is None     # no cut: reported as such
    union = {"step": "any_of", "branches": [{"name": "empty", "steps": [nothing, cut]},
                                            {"name": "sizes", "steps": [{"step": "image_size"}]}]}
    alone = run(load_recipe({"name": "sizes", "steps": [{"step": "image_size"}]}), pool, str(tmp_path / "alone"))
    f = run(load_recipe({"name": "union", "steps": [union]}), pool, str(tmp_path / "union"))
    assert f["kept_unique"] == alone["kept_unique"] > 0
