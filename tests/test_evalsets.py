"""The real DataComp evaluation layout (tests/fixtures/evalsets.py): reading it offline, evaluating
it with a tiny open_clip model, resume keys, the tasks stage's check, and the hostile inputs an
evaluation set can hold (a pickle member, a decompression bomb, a corrupt image, a torn results line)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tests.helpers import env_for_subprocess  # noqa: E402
from tests.fixtures import evalsets as F  # noqa: E402
from winnow import evaluate as E  # noqa: E402
from winnow import jobs  # noqa: E402
from winnow import tasks as T  # noqa: E402
from winnow.tasks import Suite, load_suite  # noqa: E402


@pytest.fixture(scope="module")
def evalroot(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalsets") / "data"
    F.write_evalsets(root)
    return root


@pytest.fixture(scope="module")
def tiny():
    from winnow import models

    torch.manual_seed(0)
    return models.load("winnow-tiny", None)


def suite_of(*keys) -> Suite:
    full = {t.key: t for t in load_suite("datacomp38").tasks}
    return Suite(layout="datacomp", tasks=[full[k] for k in keys])


def test_registry_names_are_download_evalsets_names():
    """download_evalsets.py: wds_<task, fairness/ dropped, / -> ->_test from djghosh; retrieval/ and
    misc/ keys are nlphuji/<name> datasets; our registry's `source` says the same."""
    suite = load_suite("datacomp38")
    assert suite.layout == "datacomp"
    for t in suite.tasks:
        d = T.task_data(t, "/data", suite.layout)
        if t.key.startswith(("retrieval/", "misc/")):
            assert d.kind == "hf" and d.dataset_id == t.source and str(d.path) == "/data/hf_cache"
        else:
            assert d.kind == "wds" and t.source == f"djghosh/{d.path.name}", t.key
    assert T.wds_dir_name("vtab/cifar100") == "wds_vtab-cifar100_test"
    assert T.wds_dir_name("fairness/dollar_street") == "wds_dollar_street_test"
    assert T.wds_dir_name("wilds/iwildcam") == "wds_wilds-iwildcam_test"
    assert {t.key for t in suite.tasks if t.type == "fairface"} == {"fairness/fairface", "fairness/utkface"}


def test_fixture_datasets_cache_loads_offline_through_load_dataset(evalroot):
    """A fresh interpreter with HF_DATASETS_OFFLINE=1 finds the three sets with plain load_dataset."""
    code = ("import datasets, sys\n"
            "for name in ['flickr_1k_test_image_text_retrieval', 'mscoco_2014_5k_test_image_text_retrieval', 'winogavil']:\n"
            "    ds = datasets.load_dataset('nlphuji/' + name, split='test', cache_dir=sys.argv[1])\n"
            "    row = ds[0]\n"
            "    print(name, len(ds), sorted(ds.column_names), type(row.get('image', (row.get('candidate_images') or [None])[0])).__name__)\n")
    env = env_for_subprocess() | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(evalroot / "hf_cache")], capture_output=True, text=True,
                          env=env, cwd=str(evalroot), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("flickr_1k_test_image_text_retrieval 12 ['caption', 'filename', 'image']")
    assert lines[2].startswith("winogavil 6 ['ID', 'associations', 'candidate_images', 'candidates', 'cue']")
    assert all(x.endswith("ImageFile") for x in lines)   # decoded PIL images, as DataComp's loaders get them


@pytest.fixture
def always_workers(monkeypatch):
    """Decode in DataLoader workers even for the fixture's tiny sets."""
    monkeypatch.setattr(T, "WORKERS_MIN_BYTES", 0)


def test_datacomp_layout_scores_present_sets_and_labels_the_partial_average(evalroot, tiny, tmp_path):
    model, pre, tok = tiny
    rows = E.evaluate_suite(model, pre, tok, load_suite("datacomp38"), str(evalroot), str(tmp_path / "r.jsonl"),
                            batch_size=16, device="cpu")
    by = {r["key"]: r for r in rows}
    present = set(F.WDS) | set(F.HF)
    assert {k for k, r in by.items() if r["status"] == "ok"} == present
    assert all(by[k]["status"] == "missing" for k in by if k not in present)
    assert by["imagenet1k"]["reason"].endswith("wds_imagenet1k_test does not exist")
    assert "wds_utkface_test" in by["fairness/utkface"]["reason"]
    # every row counted every sample, none quarantined; the multi-shard sets were read whole
    assert by["cifar10"]["metrics"]["n"] == 36 and by["vtab/caltech101"]["metrics"]["n"] == 36
    assert by["retrieval/mscoco_2014_5k_test_image_text_retrieval"]["metrics"]["captions"] == 60
    assert by["misc/winogavil"]["metrics"]["n"] == 6
    assert all(by[k]["quarantined"] == 0 and by[k]["precision"] == "fp32" for k in present)
    # the main metric of each present task exists and is in [0, 1]
    for k in present - {"fairness/fairface"}:
        assert 0 <= by[k]["main"] <= 1 and by[k]["main"] == by[k]["metrics"][by[k]["main_metric"]]
    assert set(by["wilds/fmow"]["metrics"]["groups"]) == {"0", "1", "2", "3", "4"}    # region 5 (Other) excluded
    assert set(by["fairness/dollar_street"]["metrics"]["groups"]) == {"0", "1", "2", "3"}
    ff = by["fairness/fairface"]
    assert ff["main"] is None and {"acc_race", "acc_race_wg", "acc_gender_x_wg", "toxicity_crime_wg",
                                   "count_race:3_gender:1"} <= set(ff["metrics"])
    s = E.summarize(rows)
    assert s["average"] is None and not s["complete"] and s["num_scored"] == 7 and s["num_ranked"] == 38
    assert s["partial_average"] == pytest.approx(np.mean([by[k]["main"] for k in present - {"fairness/fairface"}]))
    assert s["average_label"].startswith("partial average of 7 of 38")
    assert s["groups_scored"]["Retrieval"] == "3/3" and s["groups_scored"]["VTAB"] == "1/13"
    assert "fairness/fairface" in s["fairness"] and "fairness/fairface" not in s["tasks"]
    assert len(s["missing"]) == 40 - 8 and "fairness/utkface" in s["missing"]


def test_workers_do_not_change_the_numbers(evalroot, tiny, tmp_path, always_workers):
    """Spawned DataLoader workers: a tar each, dataset rows in blocks, another batch size. (Fewer
    tars than workers, each worker taking every n-th sample: the pickle test.)"""
    model, pre, tok = tiny
    suite = suite_of("cifar10", "retrieval/flickr_1k_test_image_text_retrieval")
    base = E.evaluate_suite(model, pre, tok, suite, str(evalroot), str(tmp_path / "a.jsonl"), batch_size=16,
                            workers=0, device="cpu")
    rows = E.evaluate_suite(model, pre, tok, suite, str(evalroot), str(tmp_path / "b.jsonl"), batch_size=5,
                            workers=2, device="cpu")
    for r, b in zip(rows, base):
        assert r["status"] == "ok" and r["metrics"] == pytest.approx(b["metrics"]), r["key"]


def test_complete_suite_has_an_average(evalroot, tiny, tmp_path):
    model, pre, tok = tiny
    rows = E.evaluate_suite(model, pre, tok, suite_of("cifar10", "misc/winogavil", "fairness/fairface"), str(evalroot),
                            str(tmp_path / "r.jsonl"), batch_size=16, device="cpu")
    s = E.summarize(rows)
    assert s["complete"] and s["average"] == s["partial_average"] == pytest.approx(
        (rows[0]["main"] + rows[1]["main"]) / 2)
    assert s["average_label"] == "average of 2" and s["num_scored"] == 2


def test_resume_is_keyed_by_model_set_spec_and_version(evalroot, tiny, tmp_path, monkeypatch):
    model, pre, tok = tiny
    root = tmp_path / "data"
    shutil.copytree(evalroot / "wds_cifar10_test", root / "wds_cifar10_test")
    shutil.copytree(evalroot / "hf_cache", root / "hf_cache")
    suite = suite_of("cifar10", "retrieval/flickr_1k_test_image_text_retrieval")
    results = tmp_path / "results.jsonl"
    calls = []
    real = {"classify": E.classify, "retrieve": E.retrieve}
    monkeypatch.setattr(E, "classify", lambda *a, **k: calls.append("cifar10") or real["classify"](*a, **k))
    monkeypatch.setattr(E, "retrieve", lambda *a, **k: calls.append("flickr") or real["retrieve"](*a, **k))

    def run(model_id="m1", s=suite):
        calls.clear()
        rows = E.evaluate_suite(model, pre, tok, s, str(root), str(results), batch_size=16, model_id=model_id, device="cpu")
        return {r["key"]: r for r in rows}, list(calls)

    first, ran = run()
    assert ran == ["cifar10", "flickr"]
    again, ran = run()
    assert ran == [] and again == first                                   # unchanged: nothing re-evaluated
    # a torn last line (a run killed mid-write) is dropped; the finished tasks are still skipped
    with open(results, "a") as fh:
        fh.write('{"key": "cifar10", "status": "o')
    _, ran = run()
    assert ran == [] and all(json.loads(x) for x in results.read_text().splitlines())
    # the set's content changed (a template): only that task runs again
    tpl = root / "wds_cifar10_test" / "zeroshot_classification_templates.txt"
    tpl.write_text(tpl.read_text() + "a blurry photo of a {c}.\n")
    _, ran = run()
    assert ran == ["cifar10"]
    # a large file is fingerprinted by size and mtime: touching it re-evaluates
    monkeypatch.setattr(jobs, "SMALL_FILE", 16)
    _, ran = run()
    assert ran == ["cifar10", "flickr"]                                   # the fingerprint rule changed the keys
    _, ran = run()
    assert ran == []
    tar = root / "wds_cifar10_test" / "test" / "0.tar"
    os.utime(tar, ns=(tar.stat().st_atime_ns, tar.stat().st_mtime_ns + 10**9))
    _, ran = run()
    assert ran == ["cifar10"]
    # the datasets cache's lock files, touched by every load, do not count
    for lock in root.joinpath("hf_cache").rglob("*.lock"):
        lock.write_text("x")
    _, ran = run()
    assert ran == []
    # another checkpoint, the task's spec, the code: everything concerned re-evaluates
    _, ran = run(model_id="m2")
    assert ran == ["cifar10", "flickr"]
    spec = suite.model_copy(deep=True)
    spec.tasks[0].main_metric = "mean_per_class_recall"
    _, ran = run("m2", spec)
    assert ran == ["cifar10"]
    monkeypatch.setattr(jobs, "code_identity", lambda *modules: "metrics.py edited")   # the code
    _, ran = run("m2", spec)
    assert ran == ["cifar10", "flickr"]
    assert len(results.read_text().splitlines()) == 2                     # one line per task


def test_pickle_members_are_never_unpickled(tmp_path, tiny, always_workers):
    """A .pyd member whose unpickling would create a directory: webdataset's default decoders run it,
    the evaluation skips it unread and scores the task."""
    import webdataset as wds

    marker = tmp_path / "pwned"
    rng = np.random.default_rng(3)
    samples = [{"__key__": f"s{i:03d}", "jpg": F.image_bytes(rng, F.COLOURS["red" if i % 2 else "blue"]), "cls": i % 2,
                "pyd": F.malicious_pickle(marker), "seg.pickle": F.malicious_pickle(marker)} for i in range(6)]
    F.write_wds_set(tmp_path / "wds_cifar10_test", [samples], ["blue", "red"], ["a {c} photo."])
    tar = str(tmp_path / "wds_cifar10_test" / "test" / "0.tar")
    with pytest.raises(FileExistsError):          # the old reader unpickles it (twice: .pyd, .pickle): the pickle is live
        for _ in wds.WebDataset(tar, shardshuffle=False).decode("pil"):
            pass
    assert marker.is_dir()
    marker.rmdir()
    model, pre, tok = tiny
    rows = E.evaluate_suite(model, pre, tok, suite_of("cifar10"), str(tmp_path), str(tmp_path / "r.jsonl"), device="cpu")
    assert rows[0]["status"] == "ok" and rows[0]["metrics"]["n"] == 6 and rows[0]["skipped_members"] == 12
    samples_seen = list(E._samples(tmp_path / "wds_cifar10_test"))       # the embed stage's compatibility reader too
    assert len(samples_seen) == 6 and "pyd" not in samples_seen[0] and not marker.exists()
    batches = list(T.iter_split(suite_of("cifar10").tasks[0], tmp_path, layout="datacomp", workers=2, batch_size=4))
    assert sorted(k for b in batches for k in b.keys) == [f"0.tar/s{i:03d}" for i in range(6)]   # one tar, 2 workers
    assert sum(b.skipped_members for b in batches) == 12 and not marker.exists()


def test_bombs_and_corrupt_images_are_quarantined_not_fatal(tmp_path, tiny, always_workers):
    from PIL import Image

    rng = np.random.default_rng(4)
    bomb = F.bomb_png()
    assert len(bomb) < 200_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(__import__("io").BytesIO(bomb))
    good = [{"__key__": f"s{i:03d}", "jpg": F.image_bytes(rng), "cls": i % 2} for i in range(10)]
    bad = [{"__key__": "bomb", "png": bomb, "cls": 0}, {"__key__": "broken", "jpg": b"\xff\xd8\xff garbage", "cls": 1}]
    F.write_wds_set(tmp_path / "wds_cifar10_test", [good[:5] + bad, good[5:]], ["a", "b"], ["{c}."])
    model, pre, tok = tiny
    for workers in (0, 2):
        rows = E.evaluate_suite(model, pre, tok, suite_of("cifar10"), str(tmp_path), str(tmp_path / f"r{workers}.jsonl"),
                                batch_size=4, workers=workers, device="cpu")
        r = rows[0]
        assert r["status"] == "ok" and r["metrics"]["n"] == 10
        assert r["quarantined"] == 2 and r["quarantine_reasons"] == {"decompression_bomb": 1, "corrupt_image": 1}
        assert r["quarantine_share"] == pytest.approx(2 / 12)
        assert sorted(r["quarantine_examples"]) == ["0.tar/bomb (decompression_bomb)", "0.tar/broken (corrupt_image)"]
    assert E.summarize(rows)["quarantined"] == {"cifar10": 2}


def test_labels_beyond_the_class_names_and_an_all_quarantined_split_are_named(tmp_path, tiny):
    """A classnames.txt shorter than the labels was scored (acc1 over a head with too few classes);
    a split whose every image failed read as "empty", hiding the quarantine that emptied it."""
    rng = np.random.default_rng(6)
    samples = [{"__key__": f"s{i:03d}", "jpg": F.image_bytes(rng), "cls": i % 6} for i in range(12)]
    F.write_wds_set(tmp_path / "wds_cifar10_test", [samples], ["a", "b", "c"], ["{c}."])
    model, pre, tok = tiny
    rows = E.evaluate_suite(model, pre, tok, suite_of("cifar10"), str(tmp_path), str(tmp_path / "r.jsonl"), device="cpu")
    assert rows[0]["status"] == "missing" and "labels run 0..5, but classnames.txt names 3 classes" in rows[0]["reason"]
    broken = [{"__key__": f"s{i:03d}", "jpg": b"\xff\xd8\xff garbage", "cls": 0} for i in range(4)]
    shutil.rmtree(tmp_path / "wds_cifar10_test")
    F.write_wds_set(tmp_path / "wds_cifar10_test", [broken], ["a", "b"], ["{c}."])
    rows = E.evaluate_suite(model, pre, tok, suite_of("cifar10"), str(tmp_path), str(tmp_path / "r2.jsonl"), device="cpu")
    assert rows[0]["status"] == "missing"
    assert "all 4 samples were quarantined ({'corrupt_image': 4}" in rows[0]["reason"], rows[0]["reason"]


def test_truncated_tar_and_absent_shards_make_the_task_missing(tmp_path, tiny):
    rng = np.random.default_rng(5)
    samples = [{"__key__": f"s{i:03d}", "jpg": F.image_bytes(rng), "cls": 0} for i in range(8)]
    d = F.write_wds_set(tmp_path / "wds_cifar10_test", [samples[:4], samples[4:]], ["a"], ["{c}."])
    tar = d / "test" / "1.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    model, pre, tok = tiny
    rows = E.evaluate_suite(model, pre, tok, suite_of("cifar10"), str(tmp_path), str(tmp_path / "r.jsonl"), device="cpu")
    assert rows[0]["status"] == "missing" and "truncated" in rows[0]["reason"]
    tar.unlink()
    assert T.check_set(suite_of("cifar10").tasks[0], tmp_path, "datacomp")["reason"].endswith("['1.tar']")


def test_check_set_names_what_is_missing(evalroot, tmp_path):
    suite = load_suite("datacomp38")
    by = {t.key: T.check_set(t, evalroot, "datacomp") for t in suite.tasks}
    assert {k for k, r in by.items() if r["status"] == "present"} == set(F.WDS) | set(F.HF)
    assert by["cifar10"]["shards"] == 2 and by["vtab/caltech101"]["shards"] == 3
    assert by["retrieval/flickr_1k_test_image_text_retrieval"]["rows"] == 12
    assert by["imagenet1k"]["reason"].endswith("wds_imagenet1k_test does not exist")
    # templates gone, a datasets cache gone
    root = tmp_path / "data"
    shutil.copytree(evalroot / "wds_cifar10_test", root / "wds_cifar10_test")
    (root / "wds_cifar10_test" / "zeroshot_classification_templates.txt").unlink()
    full = {t.key: t for t in suite.tasks}
    assert "zeroshot_classification_templates.txt not found" in T.check_set(full["cifar10"], root, "datacomp")["reason"]
    r = T.check_set(full["misc/winogavil"], root, "datacomp")
    assert r["status"] == "missing" and "nlphuji/winogavil" in r["reason"]


def _params(data_root, allow_partial):
    from winnow.config import Params

    return Params.model_validate({"eval": {"suite": "datacomp38", "data_root": str(data_root),
                                           "allow_partial": allow_partial}})


def test_tasks_stage_fails_naming_missing_sets_unless_partial_is_allowed(evalroot, tmp_path, monkeypatch):
    from stages import tasks as stage
    from winnow.config import ParamsError
    from winnow.validate import GateError

    monkeypatch.chdir(tmp_path)
    suite = load_suite("datacomp38")
    with pytest.raises(GateError) as exc:
        stage.check_real(_params(evalroot, False), suite)
    msg = str(exc.value)
    assert "32 of 40 evaluation sets missing" in msg and "imagenet1k" in msg and "fairness/utkface" in msg
    assert "allow_partial" in msg and "cifar10:" not in msg
    out = stage.check_real(_params(evalroot, True), suite)
    assert out["tasks"] == 8 and out["missing"] == 32
    sets = json.loads((tmp_path / "data/tasks/sets.json").read_text())
    assert len(sets["sets"]) == 40 and all(r["fingerprint"] for r in sets["sets"] if r["status"] == "present")
    with pytest.raises(ParamsError, match="inside data/tasks"):
        stage.check_real(_params("data/tasks/real", True), suite)


def test_iter_split_streams_bounded_batches_for_alignment(tmp_path, tiny, always_workers):
    """The alignment-targets API: a demo-layout train split, PIL or preprocessed, in batches."""
    from winnow.demo.tasks import generate_task

    demo = load_suite("demo")
    shapes = demo.tasks[0]
    generate_task(shapes, str(tmp_path), 0, 8, 20)
    _, pre, _ = tiny
    pil = list(T.iter_split(shapes, tmp_path, "train", batch_size=6, kind="images"))
    assert [len(b.keys) for b in pil] == [6, 6, 6, 2] and pil[0].images[0].mode == "RGB"
    assert pil[0].labels.tolist() == [0, 1, 2, 3, 4, 5]
    x = list(T.iter_split(shapes, tmp_path, "train", transform=pre, batch_size=8, kind="images", workers=1))
    assert [tuple(b.images.shape) for b in x] == [(8, 3, 64, 64), (8, 3, 64, 64), (4, 3, 64, 64)]
    with pytest.raises(T.MissingTask):
        next(T.iter_split(demo.tasks[1], tmp_path, "train"))


def test_device_selection_and_autocast_by_device_type(monkeypatch, tiny):
    """The GPU path's decisions, checked on any machine: CUDA when there is one (auto), bf16 autocast
    chosen by device type, plain fp32 on the CPU."""
    import contextlib
    import warnings

    cpu = torch.device("cpu")
    assert E.pick_device("cpu") == cpu and E.precision(cpu) == "fp32"
    assert isinstance(E.autocast(cpu), contextlib.nullcontext)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # without CUDA, torch warns and disables the context it builds
        ctx = E.autocast(torch.device("cuda", 0))
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16
    assert E.precision(torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert E.pick_device("auto") == torch.device("cuda") and E.pick_device("cuda:1") == torch.device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert E.pick_device("auto") == cpu
    with pytest.raises(ValueError, match="no CUDA"):
        E.pick_device("cuda")
    model, _, tok = tiny
    runner = E.Runner(model, tok, "auto")
    f = runner.texts(["a red thing", "a blue thing"])
    assert f.dtype == torch.float32 and f.device == cpu and torch.allclose(f.norm(dim=-1), torch.ones(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path_matches_cpu(evalroot, tiny, tmp_path):
    model, pre, tok = tiny
    suite = suite_of("cifar10", "retrieval/flickr_1k_test_image_text_retrieval")
    gpu = E.evaluate_suite(model, pre, tok, suite, str(evalroot), str(tmp_path / "g.jsonl"), device="cuda", workers=2)
    cpu = E.evaluate_suite(model.cpu(), pre, tok, suite, str(evalroot), str(tmp_path / "c.jsonl"), device="cpu")
    assert [r["precision"] for r in gpu] == ["bf16", "bf16"]
    for g, c in zip(gpu, cpu):
        assert abs(g["main"] - c["main"]) <= 0.1
