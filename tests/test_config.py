import pytest
import yaml

from winnow.config import ParamsError, load_params
from winnow.filters.engine import load_recipe


def write(tmp_path, data):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_repo_params_are_valid():
    from winnow.config import ROOT

    p = load_params(ROOT / "params.yaml")
    load_recipe(p.filter.recipe)


def test_typo_suggests_nearest_key(tmp_path):
    with pytest.raises(ParamsError) as e:
        load_params(write(tmp_path, {"pool": {"num_sample": 10}}))
    msg = str(e.value)
    assert "pool.num_sample" in msg and "did you mean 'num_samples'" in msg


def test_top_level_typo(tmp_path):
    with pytest.raises(ParamsError, match="did you mean 'filter'"):
        load_params(write(tmp_path, {"filtr": {"recipe": "basic"}}))


def test_bad_value_named(tmp_path):
    with pytest.raises(ParamsError, match="pool.shard_size"):
        load_params(write(tmp_path, {"pool": {"shard_size": 0}}))


def test_yaml_is_loaded_safely(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ParamsError, match=r"params.yaml:1:7: could not determine a constructor"):
        load_params(p)   # refused, with its place, as one line


def test_unknown_recipe_lists_choices():
    with pytest.raises(ParamsError) as e:
        load_recipe("clip_scor_top30")
    assert "clip_score_top30" in str(e.value) and "basic" in str(e.value)


def test_unknown_step_and_field(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"name": "x", "steps": [{"step": "languge"}]}))
    with pytest.raises(ParamsError, match="did you mean 'language'"):
        load_recipe(str(r))
    r.write_text(yaml.safe_dump({"name": "x", "steps": [{"step": "image_size", "min_sid": 3}]}))
    with pytest.raises(ParamsError, match="did you mean 'min_side'"):
        load_recipe(str(r))
    r.write_text(yaml.safe_dump({"name": "x", "steps": [{"step": "clip_score", "score": "s"}]}))
    with pytest.raises(ParamsError, match="threshold' or 'fraction"):
        load_recipe(str(r))


def test_set_params_keeps_comments_and_validates(tmp_path):
    from winnow.config import ROOT, set_params

    p = tmp_path / "params.yaml"
    original = (ROOT / "params.yaml").read_text()
    p.write_text(original)
    set_params(p, {"filter.recipe": load_params(p).filter.recipe})
    assert p.read_text() == original   # setting a value to what it is rewrites nothing (nulls stay `null`)
    set_params(p, {"filter.recipe": "basic", "train.scale": "micro", "pool.noise.mismatched": 0.2})
    text = p.read_text()
    # only the three lines change, each keeping its comment at the same column
    changed = [(a, b) for a, b in zip(original.splitlines(), text.splitlines()) if a != b]
    assert len(text.splitlines()) == len(original.splitlines())
    assert [b.split("#")[0].strip() for _, b in changed] == ["mismatched: 0.2", "recipe: basic", "scale: micro"]
    assert all(a.index("#") == b.index("#") and a.split("#", 1)[1] == b.split("#", 1)[1] for a, b in changed)
    params = load_params(p)
    assert (params.filter.recipe, params.train.scale, params.pool.noise.mismatched) == ("basic", "micro", 0.2)
    before = p.read_text()
    with pytest.raises(ParamsError, match="'recpe' not found"):
        set_params(p, {"filter.recpe": "x"})
    with pytest.raises(ParamsError, match="'x' not found"):   # below a scalar
        set_params(p, {"seed.x": 1})
    with pytest.raises(ParamsError, match="pool.shard_size"):
        set_params(p, {"pool.shard_size": -1})
    assert p.read_text() == before   # nothing written on error


def test_recipe_bounds_must_be_ordered_and_fractions(tmp_path):
    from winnow.config import ParamsError
    from winnow.filters.engine import load_recipe

    with pytest.raises(ParamsError, match="min_fraction 0.6 is above max_fraction 0.4"):
        load_recipe({"name": "x", "bounds": {"min_fraction": 0.6, "max_fraction": 0.4}, "steps": []})
    with pytest.raises(ParamsError, match="max_fraction"):
        load_recipe({"name": "x", "bounds": {"max_fraction": 1.5}, "steps": []})


def test_a_recipe_file_outside_configs_recipes_is_refused_for_a_run(tmp_path):
    """DVC tracks configs/recipes (and inline recipes through params): a file elsewhere could change
    without the filter re-running, so the pipeline refuses it and says how to fix it."""
    import shutil

    from winnow.config import CONFIGS, Filter, ParamsError
    from winnow.filters.engine import params_recipe

    outside = tmp_path / "mine.yaml"
    shutil.copy(CONFIGS / "recipes" / "basic.yaml", outside)
    with pytest.raises(ParamsError, match="outside configs/recipes/.*copy it into configs/recipes/"):
        params_recipe(Filter(recipe=str(outside)))
    assert params_recipe(Filter(recipe=str(CONFIGS / "recipes" / "basic.yaml"))).name == "basic"
    assert params_recipe(Filter(recipe="basic")).name == "basic"
    assert params_recipe(Filter(recipe={"name": "inline", "steps": [{"step": "image_size"}]})).name == "inline"
