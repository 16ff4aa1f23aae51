"""The plan: what a recipe needs that the pool lacks (no scorer when none is needed), and alignment
targets read from an embeddings file."""
import pickle

import numpy as np
import pytest
import torch

from winnow.config import ParamsError
from winnow.filters.engine import load_recipe
from winnow.plan import needs
from winnow.pool.view import Pool
from winnow import targets


@pytest.mark.parametrize("recipe,scorer,encode,task_targets", [
    ("no_filter", False, [], False),
    ("basic", False, [], False),
    ("laion2b", False, [], False),
    ("clip_b32_top30", False, [], False),
    ("clip_l14_top30", False, [], False),
    ("clip_score_top30", True, ["img", "txt"], False),
    ("image_based", True, ["img"], True),
    ("image_based_l14", False, [], False),          # the pool's own l14_img + a targets file
    ("devil_in_details", True, ["flip", "img", "txt"], True),
])
def test_a_recipe_needs_a_scorer_only_for_what_the_pool_lacks(demo_pool, recipe, scorer, encode, task_targets):
    verdict, rows = needs(load_recipe(recipe), Pool.open(str(demo_pool)), "scorer")
    assert verdict == {"scorer": scorer, "encode": encode, "targets": task_targets, "name": "scorer" if scorer else None}
    assert {r["from"] for r in rows} <= {"pool", "embed"}


def test_each_step_needs_only_its_encodings(demo_pool):
    r = load_recipe({"name": "flip", "steps": [{"step": "flip_score", "score": "scorer_score",
                                                "flip_score": "scorer_flip_score", "max_drop": 0.1}]})
    verdict, _ = needs(r, Pool.open(str(demo_pool)), "scorer")
    assert verdict["encode"] == ["flip", "img", "txt"]
    r = load_recipe({"name": "dedup", "steps": [{"step": "dedup_near", "embedding": "scorer_img"}]})
    assert needs(r, Pool.open(str(demo_pool)), "scorer")[0]["encode"] == ["img"]


def test_an_input_nobody_makes_fails_before_any_work(demo_pool):
    r = load_recipe({"name": "x", "steps": [{"step": "clip_score", "score": "l14_flip_score", "fraction": 0.3}]})
    with pytest.raises(ParamsError, match="needs column 'l14_flip_score'.*scorer_flip_score"):
        needs(r, Pool.open(str(demo_pool)), "scorer")


def test_a_targets_file_replaces_task_targets_only_for_the_tasks_it_names(demo_pool):
    step = {"step": "image_clusters", "key": "l14_img", "tasks": ["imagenet1k", "cars"], "clusters": 5}
    r = load_recipe({"name": "x", "steps": [step]}, targets={"imagenet1k": "a.npy"})
    assert needs(r, Pool.open(str(demo_pool)), "scorer")[0]["targets"] is True      # cars has no file
    r = load_recipe({"name": "x", "steps": [step]}, targets={"imagenet1k": "a.npy", "cars": "b.npy"})
    assert needs(r, Pool.open(str(demo_pool)), "scorer")[0] == {"scorer": False, "encode": [], "targets": False, "name": None}


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_targets_files_in_every_accepted_format(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 8)).astype(np.float32), rng.standard_normal((3, 8)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.savez(tmp_path / "b.npz", image_features=b, other=np.zeros(2))
    torch.save({"image_features": torch.from_numpy(a).half()}, tmp_path / "c.pt")   # DataComp's in1k_clip_vit_l14_*
    torch.save(torch.from_numpy(b), tmp_path / "d.pt")
    assert np.allclose(targets.load(str(tmp_path / "a.npy")), _unit(a))
    assert np.allclose(targets.load(str(tmp_path / "b.npz")), _unit(b))
    assert np.allclose(targets.load(str(tmp_path / "c.pt")), _unit(a), atol=1e-2)
    both = targets.load([str(tmp_path / "c.pt"), str(tmp_path / "d.pt")])
    assert both.shape == (8, 8) and np.allclose(np.linalg.norm(both, axis=1), 1, atol=1e-5)


class _Boom:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/winnow-targets-pwned",))


def test_a_hostile_or_bad_targets_file_is_a_named_error_and_never_unpickled(tmp_path):
    import os

    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"image_features": _Boom()}, fh)
    if os.path.exists("/tmp/winnow-targets-pwned"):
        os.unlink("/tmp/winnow-targets-pwned")
    with pytest.raises(ParamsError, match="evil.pt cannot be read"):
        targets.load(str(tmp_path / "evil.pt"))
    assert not os.path.exists("/tmp/winnow-targets-pwned")
    with pytest.raises(ParamsError, match="not found"):
        targets.load(str(tmp_path / "missing.npy"))
    np.save(tmp_path / "flat.npy", np.zeros(4, np.float32))
    with pytest.raises(ParamsError, match=r"shape \(4,\)"):
        targets.load(str(tmp_path / "flat.npy"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ParamsError, match=".npy, .npz or .pt"):
        targets.load(str(tmp_path / "x.txt"))
