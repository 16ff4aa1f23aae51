"""The evaluation metrics DataComp reports, on plain arrays (one definition each, tested directly).

Classification: acc1/acc5, mean per-class recall, macro F1 over the classes present (WILDS'
``F1-macro_all``, iWildCam), and worst-group accuracy over a metadata field (FMoW regions, GeoDE
regions, Dollar Street income groups), where empty groups and excluded ones (FMoW's "Other") do not
count. WinoGAViL: per instance, the top-n candidates by similarity (n = true associations) against
the true set, Jaccard index, averaged by candidate-set size.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score, jaccard_score


def topk(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest logits per row, best first."""
    k = min(k, logits.shape[1])
    part = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(logits, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


def mean_per_class_recall(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))


def macro_f1(pred: np.ndarray, y: np.ndarray) -> float:
    """Macro F1 over the classes that occur in ``y`` (what WILDS' F1(average='macro') computes)."""
    return float(f1_score(y, pred, average="macro", labels=np.unique(y), zero_division=0))


def worst_group(correct: np.ndarray, groups: np.ndarray, exclude: list[int] = ()) -> tuple[float, dict]:
    """Lowest per-group mean of ``correct`` among non-empty, non-excluded groups, and every group's value."""
    per = {int(g): float(correct[groups == g].mean()) for g in np.unique(groups) if int(g) not in set(exclude)}
    if not per:
        raise ValueError("worst_group: no group left after exclusions")
    return min(per.values()), per


def classification_metrics(logits: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None,
                           exclude: list[int] = (), suffix: str = "wg") -> dict:
    """Everything DataComp reports for a zero-shot classification task, from logits (n x classes)."""
    top = topk(logits, 5)
    pred = top[:, 0]
    hit1, hit5 = pred == y, (top == y[:, None]).any(1)
    out = {"acc1": float(hit1.mean()), "acc5": float(hit5.mean()),
           "mean_per_class_recall": mean_per_class_recall(pred, y), "F1-macro_all": macro_f1(pred, y)}
    if groups is not None:
        out[f"acc_{suffix}"], per = worst_group(hit1, groups, exclude)
        out[f"acc_top5_{suffix}"], per5 = worst_group(hit5, groups, exclude)
        out["groups"] = {str(g): {"acc1": per[g], "acc5": per5[g], "n": int((groups == g).sum())} for g in per}
    return out


def winogavil_metrics(scores: list[np.ndarray], truths: list[np.ndarray]) -> dict:
    """Jaccard of the top-|associations| candidates per instance; DataComp's main metric is the mean
    over instances with 10-12 candidates (``jaccard_score_10-12``)."""
    js, sizes = [], []
    for s, t in zip(scores, truths):
        t = np.asarray(t, bool)
        pick = np.zeros(len(s), bool)
        pick[np.argsort(s, kind="stable")[len(s) - int(t.sum()):]] = True
        js.append(jaccard_score(t, pick, zero_division=0.0))
        sizes.append(len(s))
    js, sizes = np.array(js), np.array(sizes)

    def mean(mask):
        return float(js[mask].mean()) if mask.any() else None

    return {"avg_jaccard_score": mean(sizes > 0), "jaccard_score_5": mean(sizes == 5),
            "jaccard_score_6": mean(sizes == 6), "jaccard_score_10": mean(sizes == 10),
            "jaccard_score_12": mean(sizes == 12), "jaccard_score_5-6": mean(sizes <= 6),
            "jaccard_score_10-12": mean(sizes >= 10), "n": len(js)}
