import json

import pandas as pd

from winnow import report


def test_report_from_stage_outputs(demo_pool, tmp_path):
    from winnow.demo.truth import truth_metrics
    from winnow.filters.engine import load_recipe, run
    from winnow.pool.view import Pool

    reports = tmp_path / "reports"
    (reports / "filter").mkdir(parents=True)
    (reports / "eval").mkdir()
    recipe = load_recipe("basic")
    funnel = run(recipe, Pool.open(str(demo_pool)), str(tmp_path / "filter"))
    d = pd.read_parquet(tmp_path / "filter" / "decisions.parquet")
    funnel["truth"] = truth_metrics(d, pd.read_parquet(demo_pool / "truth.parquet"), recipe.labels())
    (reports / "filter" / "funnel.json").write_text(json.dumps(funnel))
    (reports / "eval" / "summary.json").write_text(json.dumps(
        {"tasks": {"shapes": 0.2, "counting": 0.3}, "groups": {"ImageNet": 0.2, "VTAB": 0.3}, "average": 0.25, "missing": ["x"]}))
    earlier = [{"run": "pipeline", "run_id": "abcd1234", "recipe": "basic", "subset_size": 10, "samples_seen": 100,
                "imagenet": 0.2, "groups": {"ImageNet": 0.2}, "average": 0.25}]
    rd = report.collect(str(reports), str(tmp_path / "noscorer"), str(tmp_path / "filter"), str(demo_pool), earlier)
    figs = report.figures(rd, str(demo_pool))
    stems = {f[0] for f in figs}
    assert {"funnel", "grid_kept", "grid_dropped_language", "eval_tasks", "eval_groups", "earlier_runs"} <= stems
    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" for _, _, png in figs)
    page = report.build_html(rd, figs)
    assert page.count("data:image/png;base64,") == len(figs)
    assert "<h2>What each step removed" in page and "Missing tasks (not scored): x" in page
    md = report.build_markdown(rd)
    assert "## Funnel" in md and "| language |" in md
    plots = report.dvc_plot_data(rd)
    assert list(plots["funnel"].step) == ["pool", "image_size", "caption_length", "language"]


def test_untrusted_text_is_escaped_in_the_html():
    """Recipe and step names, params and captions come from files a user writes: they show as text."""
    evil = "<script>alert(1)</script>"
    funnel = {"recipe": evil, "pool_size": 10, "kept_unique": 5, "kept_fraction": 0.5, "subset_size": 5,
              "steps": [{"step": evil, "params": {"name": evil, "lang": evil}, "state": {},
                         "kept_after": 5, "dropped_here": 5, "dropped_standalone": 5}]}
    run = report.RunData(funnel=funnel, summary={"tasks": {evil: 0.5}, "groups": {}, "average": 0.5},
                         quality={}, timings={})
    page = report.build_html(run, [("funnel", f'x"><img src=y onerror=alert(2)>{evil}', b"\x89PNG")])
    assert "alert(1)</script>" not in page and "<img src=y" not in page
    # recipe, step, params, task, and the caption as alt text and figcaption
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 6
    assert 'alt="x&#34;&gt;&lt;img src=y onerror=alert(2)&gt;' in page
    assert page.count("<script>") == 1   # the page's own image check


def test_the_delta_is_measured_against_a_no_filter_run_on_the_same_pool_and_evaluation():
    """The newest no_filter parent at the same scale was the baseline even when it ran on another
    pool: a sweep over pool.* measured Δ against a different world."""
    from winnow import compare, track
    from winnow.config import Params

    p = Params()
    same = track.comparable(p)
    assert track.comparable(Params.model_validate({"filter": {"recipe": "basic"}, "train": {"seed": 3}})) == same
    for other in ({"pool": {"num_samples": 800}}, {"eval": {"test_samples": 10}}, {"seed": 1},
                  {"train": {"scale": "micro"}}, {"pool": {"loose_captions": 0.5}}, {"pool": {"text_on_objects": 0.5}}):
        assert track.comparable(Params.model_validate(other)) != same, other
    # a world knob at its off value leaves the pool byte-identical, so runs recorded before the
    # knob existed stay comparable: this is the default params' tag from before pool.loose_captions
    assert same == track.comparable(Params.model_validate({"pool": {"loose_captions": 0.0, "text_on_objects": 0.0}})) == "3ed8651b1e90c1e0"
    row = {"recipe": "no_filter", "scale": "tiny", "average": 0.3, "partial": False}
    rows = [row | {"run_id": "newer", "comparable": "another pool"}, row | {"run_id": "older", "comparable": same}]
    assert compare.baseline(rows, "tiny", comparable=same)["run_id"] == "older"
    assert compare.baseline(rows[:1], "tiny", comparable=same) is None
