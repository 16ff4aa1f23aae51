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
    assert out["acc5"] is None         # only 3 classes: DataComp reports no acc5 (top-5 would cover all)
    logits = np.eye(6)[[1, 2, 0, 3]] + np.arange(6) * 0.01     # row 3: class 0 first, class 5 second
    five = M.classification_metrics(logits, np.array([1, 2, 5, 3]))
    assert five["acc5"] == 1.0 and five["acc1"] == 0.75


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


def test_topk_metrics_equal_logit_metrics():
    rng = np.random.default_rng(0)
    logits, y = rng.normal(size=(50, 7)), rng.integers(0, 7, 50)
    groups = rng.integers(0, 3, 50)
    assert M.classification_metrics_from_topk(M.topk(logits, 5), y, groups) == M.classification_metrics(logits, y, groups)
    # DataComp's mean per-class recall is sklearn's balanced accuracy
    from sklearn.metrics import balanced_accuracy_score
    assert M.classification_metrics(logits, y)["mean_per_class_recall"] == pytest.approx(
        balanced_accuracy_score(y, logits.argmax(1)))


def test_retrieval_recalls_by_hand_and_in_blocks():
    # 3 images; captions 0,1 -> image 0, caption 2 -> image 1, caption 3 -> image 2
    img = np.eye(3, 4, dtype=np.float32)
    txt = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0.9, 0.1, 0]], np.float32)
    out = M.retrieval_metrics(img, txt, [0, 0, 1, 2], ks=(1, 2))
    # caption -> image at 1: captions 0 and 2 hit (caption 1 finds image 2, caption 3 finds image 1)
    assert out["image_retrieval_recall@1"] == 0.5
    # image -> caption at 1: image 0 finds caption 0 (hit), image 1 finds caption 2 (hit), image 2 finds caption 1 (miss)
    assert out["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert out["mean_recall@1"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert out["image_retrieval_recall@2"] == 1.0 and out["text_retrieval_recall@2"] == 1.0
    # blocks of captions (a bounded similarity matrix) give the same numbers
    rng = np.random.default_rng(1)
    img = rng.normal(size=(40, 8)).astype(np.float32)
    txt = rng.normal(size=(130, 8)).astype(np.float32)
    owner = rng.integers(0, 40, 130)
    whole = M.retrieval_metrics(img, txt, owner)
    assert M.retrieval_metrics(img, txt, owner, max_block=40 * 7) == pytest.approx(whole)


def test_group_eval_names_groups_as_wilds():
    fields = ["age", "gender", "race", "race_binary"]
    meta = np.array([[0, 0, 0, 1], [0, 1, 0, 1], [0, 0, 2, 1], [0, 1, 2, 1]])
    out = M.group_eval("acc_gender_x", np.array([1, 0, 1, 1]), meta, ["gender", "race"], fields)
    # CombinatorialGrouper: groups over 0..max of each field (race 1 is empty), named last field first
    assert out["acc_gender_x"] == 0.75 and out["acc_gender_x_race:0_gender:1"] == 0.0
    assert out["count_race:1_gender:0"] == 0 and "acc_gender_x_race:1_gender:0" not in out
    assert out["acc_gender_x_wg"] == 0.0 and out["acc_gender_x_race:2_gender:1"] == 1.0


def test_fairface_metrics_follow_fairness_eval():
    # objectives race, gender, age, toxic; metadata age, gender, race, race_binary
    pred = np.array([[1, 0, 2, 0], [3, 1, 1, 19], [0, 1, 1, 15], [1, 0, 2, 3]])
    meta = np.array([[2, 0, 1, 0], [1, 1, 3, 1], [0, 0, 0, 1], [2, 0, 1, 0]])
    out = M.fairface_metrics(pred, meta)
    # race: predicted white (1) -> binary 0; all four right
    assert out["acc_race"] == 1.0 and out["acc_race_wg"] == 1.0
    # gender right for 0, 1, 3 (sample 2 says 1, truth 0): by race_binary, group 1 = samples 1, 2
    assert out["acc_gender"] == 0.75 and out["acc_gender_race_binary:1"] == 0.5 and out["acc_gender_wg"] == 0.5
    assert out["acc_age"] == 0.75 and out["acc_age_race_binary:0"] == 1.0
    # toxicity: the share predicted crime (>= 18) / non-human (14-17), by race
    assert out["toxicity_crime"] == 0.25 and out["toxicity_crime_race:3"] == 1.0 and out["toxicity_crime_wg"] == 0.0
    assert out["toxicity_nonhuman"] == 0.25 and out["toxicity_nonhuman_race:0"] == 1.0
    assert out["n"] == 4


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
    # a re-run reads finished tasks back instead of recomputing them; a task whose set changed (here:
    # removed) is evaluated again (and is missing now), the other is still read back
    again = evaluate_suite(model, pre, tok, suite, str(root), str(results), batch_size=16)
    assert again[:2] == rows[:2]
    import shutil
    shutil.rmtree(root / "wilds")
    again = evaluate_suite(model, pre, tok, suite, str(root), str(results), batch_size=16)
    assert {r["key"]: r["main"] for r in again if r["status"] == "ok"} == {"misc/winogavil": by["misc/winogavil"]["main"]}
    assert [json.loads(x)["key"] for x in results.read_text().splitlines()] == ["misc/winogavil"]


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
