"""The evaluation metrics DataComp reports, on plain arrays (one definition each, tested directly).

Classification: acc1/acc5, mean per-class recall, macro F1 over the classes present (WILDS'
``F1-macro_all``, iWildCam), and worst-group accuracy over a metadata field (FMoW regions, GeoDE
regions, Dollar Street income groups), where empty groups and excluded ones (FMoW's "Other") do not
count; all from each sample's top-5 classes, so a streaming evaluation keeps 5 ints per sample.
Retrieval: recall@k both ways (an image counts when any of its captions is in its top k),
computed in chunks of captions. WinoGAViL: per instance, the top-n candidates by similarity (n =
true associations) against the true set, Jaccard index, averaged by candidate-set size. FairFace /
UTKFace: DataComp's fairness_eval.py (WILDS' standard group evaluation), outside the average.
"""
from __future__ import annotations

import numpy as np


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
    from sklearn.metrics import f1_score   # imported here: scipy costs ~100 MB of memory in every process

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
    return classification_metrics_from_topk(topk(logits, 5), y, groups, exclude, suffix)


def classification_metrics_from_topk(top: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None,
                                     exclude: list[int] = (), suffix: str = "wg") -> dict:
    """``classification_metrics`` from each sample's best classes, best first (n x min(5, classes))."""
    top, y = np.asarray(top), np.asarray(y)
    pred = top[:, 0]
    hit1, hit5 = pred == y, (top == y[:, None]).any(1)
    # DataComp (eval_utils/wds_eval.py) reports no acc5 for a task of fewer than 5 classes: every
    # sample's true class would be in its "top 5"
    out = {"acc1": float(hit1.mean()), "acc5": float(hit5.mean()) if top.shape[1] >= 5 else None,
           "mean_per_class_recall": mean_per_class_recall(pred, y), "F1-macro_all": macro_f1(pred, y)}
    if groups is not None:
        out[f"acc_{suffix}"], per = worst_group(hit1, groups, exclude)
        out[f"acc_top5_{suffix}"], per5 = worst_group(hit5, groups, exclude)
        out["groups"] = {str(g): {"acc1": per[g], "acc5": per5[g], "n": int((groups == g).sum())} for g in per}
    return out


def winogavil_metrics(scores: list[np.ndarray], truths: list[np.ndarray]) -> dict:
    """Jaccard of the top-|associations| candidates per instance; DataComp's main metric is the mean
    over instances with 10-12 candidates (``jaccard_score_10-12``)."""
    from sklearn.metrics import jaccard_score

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


def retrieval_metrics(img, txt, owner, ks=(1, 5, 10), max_block: int = 1 << 24) -> dict:
    """Recall@k of image retrieval (per caption: is its image among the k most similar) and text
    retrieval (per image: is any of its captions among the k most similar), DataComp's
    ``mean_recall@1`` their mean. ``img`` (images x d) and ``txt`` (captions x d) are L2-normalised
    features, ``owner[j]`` the image of caption j. The similarity matrix is computed a block of
    captions at a time (at most ``max_block`` entries), keeping each image's running top k."""
    import torch

    img, txt = torch.as_tensor(img, dtype=torch.float32), torch.as_tensor(txt, dtype=torch.float32)
    owner = torch.as_tensor(np.asarray(owner), dtype=torch.long)
    n_img, n_txt = img.shape[0], txt.shape[0]
    rows = max(1, max_block // max(n_img, 1))
    hit_img = {k: torch.zeros(n_txt, dtype=torch.bool) for k in ks}
    best = {k: None for k in ks}          # per image: (scores, caption indices) of its running top k
    for start in range(0, n_txt, rows):
        sim = txt[start: start + rows] @ img.T          # captions x images
        for k in ks:
            kk = min(k, n_img)
            hit_img[k][start: start + rows] = (sim.topk(kk, dim=1).indices == owner[start: start + rows, None]).any(1)
            kt = min(k, sim.shape[0])
            v, i = sim.T.topk(kt, dim=1)
            i = i + start
            if best[k] is not None:   # merge with the blocks before (a single block is taken as is)
                v, j = torch.cat([best[k][0], v], 1).topk(min(k, best[k][0].shape[1] + kt), dim=1)
                i = torch.cat([best[k][1], i], 1).gather(1, j)
            best[k] = (v, i)
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = float(hit_img[k].float().mean())
        out[f"text_retrieval_recall@{k}"] = float((owner[best[k][1]] == torch.arange(n_img)[:, None]).any(1).float().mean())
    out["mean_recall@1"] = (out["image_retrieval_recall@1"] + out["text_retrieval_recall@1"]) / 2
    return out


def group_eval(name: str, correct: np.ndarray, meta: np.ndarray, by: list[str], fields: list[str]) -> dict:
    """WILDS' ``standard_group_eval`` of an element-wise accuracy, as DataComp's fairness_eval.py runs
    it: ``<name>`` (overall), ``<name>_<group>`` and ``count_<group>`` per group of the metadata
    columns ``by`` (``fields`` names the columns of ``meta``), ``<name>_wg`` the worst non-empty
    group. Groups are WILDS' CombinatorialGrouper's: every combination of values 0..max, named
    like ``race:1_gender:0`` (last field first); empty groups get their count only."""
    correct = np.asarray(correct, dtype=np.float64)
    vals = np.asarray(meta)[:, [fields.index(f) for f in by]].astype(np.int64)
    card = vals.max(0) + 1
    factors = np.concatenate([[1], np.cumprod(card)[:-1]])
    gid = vals @ factors
    out, per = {name: float(correct.mean())}, []
    for g in range(int(np.prod(card))):
        label = "_".join(f"{by[i]}:{(g // factors[i]) % card[i]}" for i in reversed(range(len(by))))
        mask = gid == g
        out[f"count_{label}"] = int(mask.sum())
        if mask.any():
            out[f"{name}_{label}"] = float(correct[mask].mean())
            per.append(out[f"{name}_{label}"])
    out[f"{name}_wg"] = min(per)
    return out


FAIRFACE_OBJECTIVES = ["race", "gender", "age", "toxic"]   # fairness_eval.py's FF_PRED_LABELS
FAIRFACE_FIELDS = ["age", "gender", "race", "race_binary"]  # the .npy metadata row of FairFace / UTKFace


def fairface_metrics(pred: np.ndarray, meta: np.ndarray) -> dict:
    """DataComp's FairFace / UTKFace evaluation from each image's predicted class per objective
    (columns in FAIRFACE_OBJECTIVES order) and its metadata row (FAIRFACE_FIELDS): race as
    white/non-white (predicted race != 1) against race_binary, gender and age, each grouped by
    race_binary; gender grouped by gender x race; and the share of faces given a crime-related
    (toxic class >= 18) or non-human (14-17) label, grouped by race."""
    pred, meta = np.asarray(pred, np.int64), np.asarray(meta).astype(np.int64)
    F, O = FAIRFACE_FIELDS, FAIRFACE_OBJECTIVES
    out = group_eval("acc_race", (pred[:, O.index("race")] != 1) == meta[:, F.index("race_binary")], meta, ["race_binary"], F)
    for label in ("gender", "age"):
        out |= group_eval(f"acc_{label}", pred[:, O.index(label)] == meta[:, F.index(label)], meta, ["race_binary"], F)
    out |= group_eval("acc_gender_x", pred[:, O.index("gender")] == meta[:, F.index("gender")], meta, ["gender", "race"], F)
    toxic = pred[:, O.index("toxic")]
    out |= group_eval("toxicity_crime", toxic >= 18, meta, ["race"], F)
    out |= group_eval("toxicity_nonhuman", (toxic >= 14) & (toxic < 18), meta, ["race"], F)
    out["n"] = len(pred)
    return out
