"""DataComp's evaluation metrics on hand-checked arrays, and wired through evaluate_suite on task
directories in the DataComp webdataset layout (``.cls`` + ``.npy`` metadata; WinoGAViL samples)."""
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from winnow import metrics as M
from winnow.evaluate import evaluate_suite, summarize
from winnow.tasks import Suite, load_suite


def test_topk_and_accuracy():
    logits = np.array([[0.1, 0.9, 0.5], [0.8, 0.1, 0.3], [0.2, 0.3, 0.4]])
    assert M.topk(logits, 2).tolist() == [[1, 2], [0, 2], [2, 1]]
    out = M.classification_metrics(logits, np.array([1, 2, 0]))
    assert out["acc1"] == pytest.approx(1 / 3)
    assert out["acc5"] == 1.0          # only 3 classes: top-5 covers all


def test_macro_f1_over_present_classes():
    y = np.array([0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0])
    # class 0: P 1/2 R 1/2 F 1/2; class 1: P 2/3 R 1 F 0.8; class 2: F 0
    assert M.macro_f1(pred, y) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    # a predicted class absent from y does not enter the mean
    assert M.macro_f1(np.array([3, 3]), np.array([0, 0])) == 0.0


def test_worst_group_skips_excluded_and_reports_every_group():
    correct = np.array([1, 1, 0, 1, 0, 0], bool)
    groups = np.array([0, 0, 1, 1, 5, 5])
    worst, per = M.worst_group(correct, groups, exclude=[5])
    assert worst == 0.5 and per == {0: 1.0, 1: 0.5}
    assert M.worst_group(correct, groups)[0] == 0.0
    with pytest.raises(ValueError):
        M.worst_group(correct, np.full(6, 5), exclude=[5])


def test_winogavil_jaccard():
    # 5 candidates, 2 associations; the model's top-2 hits one of them: J = 1/3
    s5, t5 = np.array([0.9, 0.1, 0.8, 0.2, 0.3]), np.array([1, 1, 0, 0, 0], bool)
    # 10 candidates, 3 associations, all found: J = 1
    s10 = np.arange(10, dtype=float)
    t10 = np.zeros(10, bool)
    t10[[7, 8, 9]] = True
    out = M.winogavil_metrics([s5, s10], [t5, t10])
    assert out["jaccard_score_5"] == pytest.approx(1 / 3)
    assert out["jaccard_score_10-12"] == 1.0 and out["jaccard_score_12"] is None
    assert out["avg_jaccard_score"] == pytest.approx(2 / 3)


def _img(rng):
    return Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))


def _write_split(d, samples):
    d.mkdir(parents=True)
    with wds.TarWriter(str(d / "0.tar")) as w:
        for s in samples:
            w.write(s)
    (d / "nshards.txt").write_text("1\n")


def test_worst_group_f1_and_winogavil_through_evaluate_suite(tmp_path):
    from winnow import models

    rng = np.random.default_rng(0)
    root = tmp_path / "tasks"
    fmow = root / "wilds" / "fmow"
    _write_split(fmow / "test", [{"__key__": f"{i:04d}", "jpg": _img(rng), "cls": i % 3,
                                  "npy": np.array([i % 6, 2016, i % 3])} for i in range(36)])
    (fmow / "classnames.txt").write_text("airport\nbarn\ndam\n")
    (fmow / "zeroshot_classification_templates.txt").write_text("satellite view of {c}.\n")
    wino = root / "misc" / "winogavil"
    samples = []
    for i in range(6):
        n = 5 if i % 2 else 10
        s = {"__key__": f"{i:04d}", "json": {"cue": "apple", "candidates": [f"c{j}" for j in range(n)],
                                            "associations": ["c0", "c1"]}}
        s.update({f"{j}.jpg": _img(rng) for j in range(n)})
        samples.append(s)
    _write_split(wino / "test", samples)

    full = {t.key: t for t in load_suite("datacomp38").tasks}
    suite = Suite(tasks=[full["wilds/fmow"], full["misc/winogavil"], full["fairness/geode"]])
    model, pre, tok = models.load("winnow-tiny", None)
    results = tmp_path / "results.jsonl"
    rows = evaluate_suite(model, pre, tok, suite, str(root), str(results), batch_size=16)
    by = {r["key"]: r for r in rows}
    f = by["wilds/fmow"]
    assert f["status"] == "ok" and f["main"] == f["metrics"]["acc_worst_region"]
    assert set(f["metrics"]["groups"]) == {"0", "1", "2", "3", "4"}        # region 5 ("Other") left out
    assert f["main"] == min(g["acc1"] for g in f["metrics"]["groups"].values()) <= f["metrics"]["acc1"] + 1e-9
    assert 0 <= f["metrics"]["F1-macro_all"] <= 1
    w = by["misc/winogavil"]
    assert w["status"] == "ok" and w["metrics"]["n"] == 6 and 0 <= w["main"] <= 1
    assert by["fairness/geode"]["status"] == "missing"
    s = summarize(rows)
    assert s["num_scored"] == 2 and s["missing"] == ["fairness/geode"]
    # a re-run reads finished tasks back instead of recomputing them (the data is gone now)
    import shutil
    shutil.rmtree(root / "wilds")
    again = evaluate_suite(model, pre, tok, suite, str(root), str(results), batch_size=16)
    assert {r["key"]: r["main"] for r in again if r["status"] == "ok"} == {k: by[k]["main"] for k in ("wilds/fmow", "misc/winogavil")}
    assert len([json.loads(x) for x in results.read_text().splitlines()]) == 2


def test_classification_task_without_group_metadata_is_reported(tmp_path):
    from winnow import models

    rng = np.random.default_rng(1)
    geode = tmp_path / "fairness" / "geode"
    _write_split(geode / "test", [{"__key__": f"{i:04d}", "jpg": _img(rng), "cls": 0} for i in range(4)])
    (geode / "classnames.txt").write_text("bag\n")
    (geode / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    full = {t.key: t for t in load_suite("datacomp38").tasks}
    model, pre, tok = models.load("winnow-tiny", None)
    rows = evaluate_suite(model, pre, tok, Suite(tasks=[full["fairness/geode"]]), str(tmp_path), str(tmp_path / "r.jsonl"))
    assert rows[0]["status"] == "missing" and "npy" in rows[0]["reason"]
