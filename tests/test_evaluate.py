from collections import Counter

import pytest

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
    assert (tmp_path / "r.jsonl").read_text() == ""                       # no task finished
    assert not list(tmp_path.rglob("_done/*.json"))                        # nothing marked: a later run retries them


def _row(key, main, status="ok", group="G", metric="acc1"):
    return {"key": key, "group": group, "main_metric": metric, "main": main, "status": status,
            "metrics": {"acc1": main} if main is not None else {}}


def test_average_only_when_every_ranked_task_is_scored():
    rows = [_row("a", 0.2), _row("b", 0.4, group="H"), _row("c", 0.6), _row("ff", None, metric=None)]
    rows[-1]["metrics"] = {"acc_race": 0.5, "groups": {}}
    s = summarize(rows)
    assert s["complete"] and s["average"] == pytest.approx(0.4) == s["partial_average"]
    assert s["average_label"] == "average of 3" and s["num_scored"] == 3 and s["num_ranked"] == 3
    assert s["groups"] == {"G": pytest.approx(0.4), "H": pytest.approx(0.4)} and s["fairness"] == {"ff": {"acc_race": 0.5}}
    rows[1] = _row("b", None, status="missing", group="H")
    s = summarize(rows)
    assert s["average"] is None and not s["complete"] and s["partial_average"] == pytest.approx(0.4)
    assert s["average_label"] == "partial average of 2 of 3 tasks (1 not scored)"
    assert s["missing"] == ["b"] and s["groups_scored"] == {"G": "2/2", "H": "0/1"} and "H" not in s["groups"]
