"""The sweep table: statistics over seeds and the 'beats no_filter beyond the seed spread' verdict."""
import pytest

from winnow.sweep import table


def _row(recipe, seed, avg, img):
    return {"recipe": recipe, "seed": seed, "average": avg, "groups": {"ImageNet": img}, "missing": [],
            "samples_seen": 16000, "subset_size": 1000 if recipe != "no_filter" else 4000, "kept_unique": 1}


def test_table_statistics_and_verdict():
    rows = [_row("no_filter", s, a, a) for s, a in enumerate([0.10, 0.12, 0.11])]
    rows += [_row("good", s, a, a) for s, a in enumerate([0.15, 0.14, 0.16])]
    rows += [_row("overlap", s, a, a) for s, a in enumerate([0.13, 0.115, 0.14])]
    text, stats = table(rows)
    assert stats["good"]["average"]["mean"] == pytest.approx(0.15)
    assert stats["good"]["average"]["std"] == pytest.approx(0.01)
    assert stats["good"]["delta_vs_baseline"] == pytest.approx(0.04)
    assert stats["good"]["beats_baseline_beyond_spread"] is True
    assert stats["good"]["beats_baseline_beyond_std"] is True
    assert stats["overlap"]["beats_baseline_beyond_spread"] is False      # 0.115 < no_filter's best 0.12
    assert stats["overlap"]["beats_baseline_beyond_std"] is True          # Δ 0.018 > std 0.0126
    assert "beats_baseline_beyond_spread" not in stats["no_filter"]
    assert "| good | 1000 | 16000 | 3 | 0.150 ± 0.010 (0.140–0.160) |" in text


def test_every_point_is_preflighted_before_any_runs(tmp_path, monkeypatch):
    """A misspelt recipe fails the sweep at once, naming it, with nothing run and params.yaml as it was."""
    from tests.helpers import MICRO_PARAMS, write_params
    from winnow import sweep as S
    from winnow.config import ParamsError

    write_params(tmp_path, MICRO_PARAMS)
    monkeypatch.chdir(tmp_path)
    before = (tmp_path / "params.yaml").read_bytes()
    ran = []
    monkeypatch.setattr(S, "run_one", lambda *a: ran.append(a))
    with pytest.raises(ParamsError, match="recipe basik") as e:
        S.sweep(["basic", "basik"], [0, 1], "micro")
    assert "filter.recipe 'basik'" in str(e.value) and "recipe basic" not in str(e.value)
    assert ran == [] and (tmp_path / "params.yaml").read_bytes() == before
    assert S.main(["no_filter"], [0], "huge") == 2                    # the CLI: the message and exit 2


def test_a_saved_point_is_reused_only_for_the_same_recipe_steps_scale_and_world(tmp_path, monkeypatch):
    """Editing a named recipe's steps, or regenerating the pool, re-runs its points; renaming or
    rewording it does not."""
    import yaml

    from tests.helpers import MICRO_PARAMS, write_params
    from winnow import sweep as S

    write_params(tmp_path, MICRO_PARAMS)
    monkeypatch.chdir(tmp_path)
    recipe = {"name": "r", "description": "x", "steps": [{"step": "clip_score", "score": "clip_l14_similarity_score", "fraction": 0.3}]}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"stages": {"pool": {"outs": [{"path": "data/pool", "md5": "a.dir"}]}}}))
    key = S.point_key(recipe, "micro")
    assert S.point_key(recipe | {"name": "other", "description": "y"}, "micro") == key
    assert S.point_key(recipe | {"steps": [{"step": "clip_score", "score": "clip_l14_similarity_score", "fraction": 0.4}]}, "micro") != key
    assert S.point_key(recipe, "tiny") != key
    lock = {"stages": {"pool": {"outs": [{"path": "data/pool", "md5": "a.dir"}]},
                       "scorer": {"outs": [{"path": "models/scorer", "md5": "skipped.dir"}]},
                       "embed": {"outs": [{"path": "data/embed", "md5": "with-flips.dir"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert S.point_key(recipe, "micro") == key      # what the last recipe asked the scorer and embed for: not the world
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["scorer"]["train"]["epochs"] += 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert S.point_key(recipe, "micro") != key      # a scorer trained otherwise is another world
    params["scorer"]["train"]["epochs"] -= 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    lock["stages"]["pool"]["outs"][0]["md5"] = "b.dir"
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert S.point_key(recipe, "micro") != key

    ran = []
    monkeypatch.setattr(S, "run_one", lambda r, seed, scale: ran.append(seed) or {"recipe": "r", "seed": seed})
    monkeypatch.setattr(S.subprocess, "run", lambda *a, **k: None)      # no dvc checkout here
    S._sweep([recipe], [0, 1], "micro", tmp_path / "res")
    assert ran == [0, 1]
    S._sweep([recipe], [0, 1], "micro", tmp_path / "res")
    assert ran == [0, 1]                                                  # both reused
    S._sweep([recipe | {"steps": [{"step": "clip_score", "score": "clip_l14_similarity_score", "fraction": 0.4}]}], [0, 1], "micro", tmp_path / "res")
    assert ran == [0, 1, 0, 1]                                            # same name, new steps: re-run


def test_a_saved_point_is_rerun_when_an_override_a_read_file_or_the_preset_changes(tmp_path, monkeypatch):
    """The key held only the recipe's steps: an override in params.yaml, an edited word list and a
    changed scale preset all reused a number measured on something else."""
    import yaml

    from tests.helpers import MICRO_PARAMS, write_params
    from winnow import config
    from winnow import sweep as S

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, MICRO_PARAMS)
    words = tmp_path / "words.txt"
    words.write_text("circle\nsquare\n")
    recipe = {"name": "r", "steps": [{"step": "text_entity", "words": str(words)}, {"step": "caption_length"}]}
    key = S.point_key(recipe, "micro")
    words.write_text("circle\n")
    assert S.point_key(recipe, "micro") != key                       # the word list's bytes
    key = S.point_key(recipe, "micro")
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["filter"]["overrides"] = {"caption_length": {"min_words": 8}}
    write_params(tmp_path, params)
    assert S.point_key(recipe, "micro") != key                       # an override params.yaml applies to every point
    key = S.point_key(recipe, "micro")
    scales = config.load_yaml(config.CONFIGS / "scales.yaml")
    scales["micro"]["samples_seen"] *= 4
    (tmp_path / "scales.yaml").write_text(yaml.safe_dump(scales))
    real = config.load_yaml
    monkeypatch.setattr(config, "load_yaml", lambda p: real(tmp_path / "scales.yaml" if str(p).endswith("scales.yaml") else p))
    assert S.point_key(recipe, "micro") != key                       # the preset's contents, not only its name
    # two scales never share a result file or an experiment name
    assert S.result_path(tmp_path, recipe, 0, "micro") != S.result_path(tmp_path, recipe, 0, "tiny")
    assert S.point_name("basic", 0, "micro") == "basic-micro-s0"
