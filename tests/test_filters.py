import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import yaml

from tests.helpers import ROOT
from winnow.executor import Executor
from winnow.config import ParamsError
from winnow.filters.clip_score import ClipScore, top_fraction_threshold
from winnow.demo.truth import truth_metrics
from winnow.filters.engine import load_recipe, run
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
    got = CaptionLength().verdict(FakeBatch(text=texts))
    want = [len(t.split()) > 2 and len(t) > 5 for t in texts]
    assert got.tolist() == want


def test_image_size_matches_datacomp_rule():
    w = np.array([200, 199, 600, 601, 300, 0])
    h = np.array([200, 400, 200, 200, 1000, 10])
    got = ImageSize().verdict(FakeBatch(original_width=w, original_height=h))
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
    assert Language(lang="de").verdict(FakeBatch(text=["ein Foto von drei roten Kreisen auf einem Hintergrund"])).all()


def test_language_takes_another_fasttext_model_file(tmp_path):
    """``lid_file`` names a fastText file (the full lid.176.bin on a machine that has it): the shipped
    ftz named explicitly decides as the default does, and keys the filter's work; a path that does
    not exist fails when the recipe is read, naming it."""
    from winnow.config import ParamsError
    from winnow.filters.text import shipped_lid_model

    captions = ["a photo of three red circles", "ein Foto von drei roten Kreisen", "trois cercles rouges", ""]
    named = Language(lid_file=str(shipped_lid_model()))
    assert named.files() == [str(shipped_lid_model())] and Language().files() == []
    assert named.verdict(FakeBatch(text=captions)).tolist() == Language().verdict(FakeBatch(text=captions)).tolist()
    from winnow.filters import build_step

    with pytest.raises(ParamsError, match="lid.176.bin does not exist"):
        build_step({"step": "language", "lid_file": str(tmp_path / "lid.176.bin")}, "recipe steps[2]")


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
        run(load_recipe("basic"), pool, str(tmp_path / ex), executor=Executor(ex, 2))
    ref = (tmp_path / "serial" / "uids.npy").read_bytes()
    assert (tmp_path / "threads" / "uids.npy").read_bytes() == ref
    assert (tmp_path / "processes" / "uids.npy").read_bytes() == ref


def test_clip_score_needs_one_source():
    with pytest.raises(ValueError):
        ClipScore(score="a", embeddings=("x", "y"), threshold=0.1)


def test_dask_through_prefect_task_runner_gives_identical_outputs(demo_pool, tmp_path):
    """A real local multi-process dask.distributed cluster reached by its scheduler address, driven
    through Prefect's DaskTaskRunner: one flow run per pass of the filter, a task run per shard."""
    import asyncio

    from distributed import LocalCluster
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId

    from winnow.executor import prefect_api

    pool = Pool.open(str(demo_pool))
    run(load_recipe("basic"), pool, str(tmp_path / "serial"))
    prefect_api()        # before the cluster starts, so its workers inherit PREFECT_API_URL
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster:
        run(load_recipe("basic"), pool, str(tmp_path / "dask"), executor=Executor("dask", 2, cluster.scheduler_address))
    assert (tmp_path / "dask" / "uids.npy").read_bytes() == (tmp_path / "serial" / "uids.npy").read_bytes()
    a = pd.read_parquet(tmp_path / "serial" / "decisions.parquet")
    b = pd.read_parquet(tmp_path / "dask" / "decisions.parquet")
    pd.testing.assert_frame_equal(a, b)

    async def recorded(flow_name):
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))
            latest = max(runs, key=lambda f: f.start_time)
            assert latest.state.is_completed()
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[latest.id])))

    # one flow run per pass, named by its job; a task run per unit, named by the unit
    probe = asyncio.run(recorded("filter basic: probe"))
    decide = asyncio.run(recorded("filter basic: image_size, caption_length, language + decisions"))
    assert sorted(t.name for t in probe) == pool.shards
    assert sorted(t.name for t in decide) == [f"decisions-{s}" for s in pool.shards]
    assert all(t.state.is_completed() for t in probe + decide)


def _fasttext_tokens(text: str) -> int:
    """fastText's Dictionary::readWord loop, as fasttext.tokenize runs it (this wheel,
    fasttext-predict, has no tokenize): separators are space \\n \\r \\t \\v \\f NUL; a newline
    met between words is an end-of-sentence token of its own."""
    n, word, i = 0, False, 0
    while i < len(text):
        c = text[i]
        if c in " \n\r\t\v\f\0":
            if word:
                n, word = n + 1, False
                if c == "\n":
                    continue            # sungetc: the newline is read again, as EOS
            elif c == "\n":
                n += 1
        else:
            word = True
        i += 1
    return n + word


def test_word_counts_match_datacomps_two_tokenizers():
    import random

    import pyarrow as pa

    from winnow.filters.text import count_words

    rng = random.Random(0)
    alphabet = list("ab1é ") + list("\n\r\t\v\f\0\x1c\x1f\x85\xa0\u1680\u2003\u2028\u202f\u3000")
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14))) for _ in range(5000)]
    texts += ["Beautiful\xa0red\xa0car", "a\nb", "\n", "  two  words  ", ""]
    arr = pa.array(texts)
    assert count_words(arr, "split").tolist() == [len(t.split()) for t in texts]
    assert count_words(arr, "fasttext").tolist() == [_fasttext_tokens(t) for t in texts]
    assert _fasttext_tokens("a\nb") == 3 and _fasttext_tokens("a b") == 2


def test_two_pass_threshold_equals_datacomps_rule():
    from winnow.filters.clip_score import TopFractionSelect

    rng = np.random.default_rng(0)
    cases = [rng.normal(0.2, 0.05, 10_000).astype(np.float32),
             np.round(rng.normal(0, 1, 5000), 2).astype(np.float32),          # ties and negatives
             np.array([np.nan, -0.0, 0.0, 1.0, -1.0, np.inf * 0, 0.5], np.float32),
             np.full(100, 0.3, np.float32)]
    for s in cases:
        parts = np.array_split(s, 7)                                           # "shards"
        for f in (0.01, 0.3, 0.5, 0.999, 1.0):
            sel = TopFractionSelect(f)
            sel.reduce((sel.part(p, 0) for p in parts), 0)
            got = sel.reduce((sel.part(p, 1) for p in parts), 1)
            assert got == top_fraction_threshold(s, f), (f, got)


def test_dask_local_cluster_runs_map_reduce_fits(demo_pool, tmp_path):
    """No address: the DaskTaskRunner starts a local multi-process cluster; the top-fraction
    threshold's two histogram passes run as shard task runs and select DataComp's exact uids."""
    pool = Pool.open(str(demo_pool))
    run(load_recipe("clip_b32_top30"), pool, str(tmp_path / "serial"))
    f = run(load_recipe("clip_b32_top30"), pool, str(tmp_path / "dask"), executor=Executor("dask", 2))
    assert (tmp_path / "dask" / "uids.npy").read_bytes() == (tmp_path / "serial" / "uids.npy").read_bytes()
    assert f["steps"][0]["state"]["threshold"] == top_fraction_threshold(
        pd.concat([shards.read_meta(str(demo_pool), s, ["clip_b32_similarity_score"]).to_pandas()
                   for s in pool.shards]).clip_b32_similarity_score.to_numpy(), 0.3)


def test_survivors_mode_is_a_funnel_with_the_same_subset(demo_pool, tmp_path, monkeypatch):
    """decide: survivors — a step sees only what every earlier step kept (language id never runs on
    a sample the size check dropped); the subset equals decide: all."""
    from winnow.filters import text

    seen = []
    real = text.detect_languages
    monkeypatch.setattr(text, "detect_languages", lambda texts, model=None: seen.append(len(texts)) or real(texts, model))
    pool, recipe = Pool.open(str(demo_pool)), load_recipe("basic")
    f = run(recipe, pool, str(tmp_path / "survivors"))
    after_length = f["steps"][1]["kept_after"]
    assert f["decide"] == "survivors" and sum(seen) == after_length == f["steps"][2]["decided"] < 600
    d = pd.read_parquet(tmp_path / "survivors" / "decisions.parquet")
    assert d["keep:language"].isna().sum() == 600 - after_length
    assert d.loc[d["keep:image_size"] == False, "keep:language"].isna().all()   # noqa: E712
    tm = truth_metrics(d, pd.read_parquet(demo_pool / "truth.parquet"), recipe.labels())
    assert tm["language"]["non_english"]["recall"] >= 0.95    # of the non-English samples it decided

    run(recipe, pool, str(tmp_path / "all"), decide="all")
    assert (tmp_path / "all" / "uids.npy").read_bytes() == (tmp_path / "survivors" / "uids.npy").read_bytes()
    assert not pd.read_parquet(tmp_path / "all" / "decisions.parquet")["keep:language"].isna().any()


def test_inline_recipe_in_params_is_validated_and_runs(demo_pool, tmp_path):
    from winnow.config import load_params

    inline = {"name": "mine", "bounds": {"min_fraction": 0.1},
              "steps": [{"step": "image_size"}, {"step": "clip_score", "score": "clip_b32_similarity_score", "fraction": 0.5}]}
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["filter"]["recipe"] = inline
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    p = load_params(str(tmp_path / "params.yaml"))
    r = load_recipe(p.filter.recipe, {"clip_score": {"fraction": 0.4}})
    assert r.name == "mine" and r.steps[1].fraction == 0.4 and r.bounds.min_fraction == 0.1
    f = run(r, Pool.open(str(demo_pool)), str(tmp_path / "out"))
    assert f["recipe"] == "mine" and 0 < f["kept_unique"] < 600
    with pytest.raises(ParamsError, match=r"params.yaml filter.recipe steps\[0\].*unknown step 'image_sise'.*did you mean 'image_size'"):
        load_recipe({"steps": [{"step": "image_sise"}]})


def test_a_language_label_fasttext_never_gives_and_a_nan_cut_are_refused(tmp_path):
    """`lang: EN`, `english` or `eng` (not one of the language-id model's labels), a lid_file that is
    not a fastText model and a NaN threshold loaded and then kept nothing or failed, found only after
    language id had run over the whole pool."""
    from winnow.config import ParamsError
    from winnow.filters.engine import load_recipe

    from winnow.filters.text import shipped_lid_model

    (tmp_path / "lid.bin").write_bytes(b"not a fastText model" * 100)
    (tmp_path / "cut.ftz").write_bytes(shipped_lid_model().read_bytes()[:1000])    # fastText: std::bad_alloc
    with pytest.raises(ParamsError, match=r"lang 'eng' is not a label of the language-id model \(176 .*did you mean 'en'"):
        load_recipe({"name": "bad", "steps": [{"step": "language", "lang": "eng"}]})
    for step in ({"step": "language", "lang": "EN"}, {"step": "language", "lang": "english"},
                 {"step": "language", "lang": "xx"}, {"step": "language", "lid_file": str(tmp_path / "lid.bin")},
                 {"step": "language", "lid_file": str(tmp_path / "cut.ftz")},
                 {"step": "clip_score", "score": "clip_b32_similarity_score", "threshold": float("nan")},
                 {"step": "image_size", "max_aspect": float("nan")}):
        with pytest.raises(ParamsError):
            load_recipe({"name": "bad", "steps": [step]})
    for code in ("zh", "als", "ceb"):        # lid.176's own labels, of 2 and 3 letters
        assert load_recipe({"name": "ok", "steps": [{"step": "language", "lang": code}]}).steps[0].lang == code
