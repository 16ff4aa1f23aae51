"""The ablation ("slice and dice"): variants of a recipe, its table and the report's chart."""
import pytest

from winnow import ablation
from winnow.config import ParamsError
from winnow.filters.engine import load_recipe


def _labels(recipe):
    return load_recipe(recipe).labels()


def test_the_shipped_spec_gives_cumulative_and_leave_one_out_variants():
    spec = ablation.load_spec("devil_in_details")
    plan = ablation.variants(spec)
    cum = [v for v in plan if v["kind"] == "cumulative"]
    loo = {v["component"]: v["recipe"] for v in plan if v["kind"] == "leave_one_out"}
    assert [v["component"] for v in cum] == list(spec.components)
    assert cum[-1]["recipe"] == "devil_in_details"            # the full recipe runs as shipped
    # leaving out the last component is the cumulative row before the full one: not run twice
    assert set(loo) == set(spec.components) - {"rebalance"}
    assert _labels(cum[0]["recipe"]) == ["image_size", "caption_length", "uninformative", "language", "dedup_exact"]
    assert _labels(cum[1]["recipe"])[-1] == "clip_score"
    assert _labels(cum[3]["recipe"])[-1] == "aligned"        # + retrieval: the union appears
    # without retrieval the union dissolves into its one branch's steps
    assert _labels(loo["retrieval"]) == _labels(cum[2]["recipe"]) + ["rebalance"]
    no_clip = load_recipe(loo["clip_score"])
    union = no_clip.steps[no_clip.labels().index("aligned")]
    assert [[s.kind for s in b.steps] for b in union.branches] == [["flip_score"], ["clip_score", "retrieval"]]
    assert _labels(loo["single_modality"]) == ["aligned", "rebalance"]
    from winnow.sweep import recipe_name

    names = [recipe_name(v["recipe"]) for v in plan]
    assert len(set(names)) == len(names)


def test_a_spec_whose_paths_miss_the_recipe_fails_naming_them():
    spec = ablation.Spec(base="devil_in_details", components={"a": ["image_size"], "b": ["aligned/nope"]})
    with pytest.raises(ParamsError, match="has no branch 'nope'"):
        ablation.variants(spec)
    spec = ablation.Spec(base="devil_in_details", components={"a": ["image_size"], "b": ["rebalance"]})
    with pytest.raises(ParamsError, match="in no component"):
        ablation.variants(spec)


def _row(recipe, seed, avg, img):
    return {"recipe": recipe, "seed": seed, "average": avg, "groups": {"ImageNet": img, "VTAB": 0.2},
            "missing": [], "samples_seen": 24000, "subset_size": 100, "kept_unique": 100}


def test_the_table_compares_each_row_with_its_reference():
    spec = ablation.Spec(base="devil_in_details", components={"single_modality": ["x"], "clip_score": ["y"]},
                         baselines=["clip_score_top30"])
    plan = [{"kind": "cumulative", "component": "single_modality", "recipe": {"name": "abl-1-single_modality"}},
            {"kind": "cumulative", "component": "clip_score", "recipe": "devil_in_details"},
            {"kind": "leave_one_out", "component": "single_modality", "recipe": {"name": "abl-no-single_modality"}}]
    rows = [_row("abl-1-single_modality", s, a, a) for s, a in enumerate([0.20, 0.21, 0.22])]
    rows += [_row("devil_in_details", s, a, a + 0.01) for s, a in enumerate([0.30, 0.31, 0.32])]
    rows += [_row("abl-no-single_modality", s, a, a) for s, a in enumerate([0.29, 0.30, 0.33])]
    rows += [_row("clip_score_top30", s, a, a) for s, a in enumerate([0.25, 0.26, 0.27])]
    text, stats = ablation.table(rows, spec, plan)
    by = {r["variant"]: r for r in stats["rows"]}
    assert by["abl-1-single_modality"]["delta"] is None
    assert by["devil_in_details"]["delta"] == pytest.approx(0.10) and by["devil_in_details"]["beyond_spread"] is True
    assert by["abl-no-single_modality"]["delta"] == pytest.approx(-0.0033, abs=1e-3)
    assert by["abl-no-single_modality"]["beyond_spread"] is False
    assert by["clip_score_top30"]["delta"] == pytest.approx(0.05)          # full − baseline
    assert by["clip_score_top30"]["delta_imagenet"] == pytest.approx(0.06)
    assert by["clip_score_top30"]["beyond_spread"] is True
    assert "| + clip_score | devil_in_details |" in text and "| baseline | clip_score_top30 |" in text


def test_the_report_charts_the_ablation(tmp_path):
    from winnow import report

    spec = ablation.Spec(base="devil_in_details", components={"single_modality": ["x"], "clip_score": ["y"]},
                         baselines=["clip_score_top30"])
    plan = [{"kind": "cumulative", "component": "single_modality", "recipe": {"name": "abl-1-single_modality"}},
            {"kind": "cumulative", "component": "clip_score", "recipe": "devil_in_details"}]
    rows = [_row("abl-1-single_modality", 0, 0.2, 0.2), _row("devil_in_details", 0, 0.3, 0.3),
            _row("clip_score_top30", 0, 0.25, 0.25)]
    _, stats = ablation.table(rows, spec, plan)
    run = report.RunData(funnel={}, summary={}, quality={}, timings={}, ablation=stats)
    figs = report.figures(run, None)
    assert [f[0] for f in figs] == ["ablation"] and figs[0][2][:8] == b"\x89PNG\r\n\x1a\n"
    html = report.build_html(run, figs)
    assert "Ablation of devil_in_details" in html and html.count("data:image/png;base64") == 1
    assert "Ablation of devil_in_details" in report.build_markdown(run)
