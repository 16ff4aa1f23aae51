"""The uid_list step: a DataComp uid file (a published subset) as a recipe step."""
import numpy as np
import pandas as pd
import pytest
import yaml

from winnow.config import ParamsError
from winnow.executor import Executor
from winnow.filters.engine import load_recipe, run
from winnow.pool import uids as U
from winnow.pool.view import Pool


def _recipe(tmp_path, steps):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"name": "r", "steps": steps}))
    return load_recipe(str(p))


def _pool_uids(pool_dir) -> list[str]:
    return sorted(pd.read_parquet(pool_dir / "truth.parquet").uid)


@pytest.mark.parametrize("executor", [Executor("serial"), Executor("processes", 2)])
def test_keep_and_drop_exactly_the_listed_uids(demo_pool, tmp_path, executor):
    everyone = _pool_uids(demo_pool)
    listed = everyone[::7] + ["0" * 32]          # a uid the pool lacks selects nothing
    U.save(tmp_path / "subset.npy", U.hex_to_array(listed))
    for mode, want in (("keep", set(everyone[::7])), ("drop", set(everyone) - set(everyone[::7]))):
        r = _recipe(tmp_path, [{"step": "uid_list", "path": str(tmp_path / "subset.npy"), "mode": mode}])
        funnel = run(r, Pool.open(str(demo_pool)), str(tmp_path / mode), executor=executor)
        got = U.array_to_hex(U.load(tmp_path / mode / "uids.npy")).tolist()
        assert got == sorted(want) and len(got) == len(want)
        assert funnel["steps"][0]["state"]["listed"] == len(listed)


def test_after_other_steps_it_intersects(demo_pool, tmp_path):
    everyone = _pool_uids(demo_pool)
    U.save(tmp_path / "subset.npy", U.hex_to_array(everyone[::3]))
    both = _recipe(tmp_path, [{"step": "image_size"}, {"step": "uid_list", "path": str(tmp_path / "subset.npy")}])
    run(both, Pool.open(str(demo_pool)), str(tmp_path / "both"))
    alone = _recipe(tmp_path, [{"step": "image_size"}])
    run(alone, Pool.open(str(demo_pool)), str(tmp_path / "alone"))
    sized = set(U.array_to_hex(U.load(tmp_path / "alone" / "uids.npy")))
    assert set(U.array_to_hex(U.load(tmp_path / "both" / "uids.npy"))) == sized & set(everyone[::3])


def test_a_missing_or_malformed_file_is_named_when_the_recipe_loads(tmp_path):
    with pytest.raises(ParamsError, match="no uid file"):
        _recipe(tmp_path, [{"step": "uid_list", "path": str(tmp_path / "absent.npy")}])
    np.save(tmp_path / "objects.npy", np.array(["a", {"b": 1}], dtype=object))
    with pytest.raises(ParamsError, match="not a DataComp uid file"):
        _recipe(tmp_path, [{"step": "uid_list", "path": str(tmp_path / "objects.npy")}])
    unsorted = U.hex_to_array(["f" * 32, "0" * 31 + "1"], sort=False)
    np.save(tmp_path / "unsorted.npy", unsorted)
    with pytest.raises(ParamsError, match="not sorted"):
        _recipe(tmp_path, [{"step": "uid_list", "path": str(tmp_path / "unsorted.npy")}])
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(ParamsError, match="not a DataComp uid file"):
        _recipe(tmp_path, [{"step": "uid_list", "path": str(tmp_path / "text.npy")}])
