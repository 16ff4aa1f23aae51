from collections import Counter

from winnow.evaluate import evaluate_suite, summarize
from winnow.tasks import load_suite


def test_datacomp_registry_matches_datacomp():
    s = load_suite("datacomp38")
    assert len(s.tasks) == 40
    scored = [t for t in s.tasks if t.main_metric]
    assert len(scored) == 38
    assert Counter(t.group for t in scored) == {"ImageNet": 1, "ImageNet dist. shifts": 6, "VTAB": 13,
                                                 "Retrieval": 3, "Other": 15}
    by_key = {t.key: t for t in s.tasks}
    assert by_key["imagenet1k"].main_metric == "acc1" and by_key["imagenet1k"].size == 50000
    assert by_key["vtab/caltech101"].main_metric == "mean_per_class_recall"
    assert by_key["wilds/fmow"].main_metric == "acc_worst_region"
    assert by_key["fairness/dollar_street"].source == "djghosh/wds_dollar_street_test"
    assert {t.key for t in s.tasks if not t.main_metric} == {"fairness/fairface", "fairness/utkface"}


def test_missing_sets_are_reported_missing_not_zero(tmp_path):

    from winnow import models

    model, pre, tok = models.load("winnow-tiny", None)
    rows = evaluate_suite(model, pre, tok, load_suite("datacomp38"), str(tmp_path / "nowhere"), str(tmp_path / "r.jsonl"))
    summary = summarize(rows)
    assert summary["average"] is None and summary["num_scored"] == 0
    assert len(summary["missing"]) == 40 and "imagenet1k" in summary["missing"]
    assert not (tmp_path / "r.jsonl").exists()   # nothing recorded, so a later run retries them
