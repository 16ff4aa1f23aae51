"""Zero-shot evaluation on a task suite stored in the DataComp / clip_benchmark webdataset layout.

Classification: a zero-shot head from class names x templates (open_clip's builder), metrics
acc1, acc5 and mean per-class recall. Retrieval: recall@k both ways; the main metric is
mean_recall@1, as DataComp reports it. Results append per task to ``results.jsonl``; a re-run
skips tasks already there. A task whose data is absent is reported missing, never scored zero.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from winnow.io import atomic_file, local
from winnow.tasks import Suite


class MissingTask(FileNotFoundError):
    pass


def _split_urls(task_dir: Path, split: str = "test") -> str:
    nfile = task_dir / split / "nshards.txt"
    if not nfile.exists():
        raise MissingTask(f"{task_dir / split} has no nshards.txt")
    n = int(nfile.read_text().strip())
    if n < 1:
        raise MissingTask(f"{task_dir / split}: nshards.txt says {n}")
    return str(task_dir / split / "0.tar") if n == 1 else f"{task_dir / split}/{{0..{n - 1}}}.tar"


def _load(task_dir: Path, label_key: str, split: str = "test"):
    import webdataset as wds

    ds = wds.WebDataset(_split_urls(task_dir, split), shardshuffle=False).decode("pil")
    return ds.to_tuple("jpg;png;jpeg;webp", label_key)


def read_zeroshot_text(task_dir: Path) -> tuple[list[str], list[str]]:
    """Class names and ``{c}`` templates of a classification task (clip_benchmark layout)."""
    out = []
    for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
        if not (task_dir / name).exists():
            raise MissingTask(f"{task_dir / name} not found")
        out.append([x.strip() for x in (task_dir / name).read_text(encoding="utf-8").splitlines() if x.strip()])
    return out[0], out[1]


def _image_features(model, preprocess, images, batch_size: int) -> torch.Tensor:
    feats = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.stack([preprocess(im) for im in images[i: i + batch_size]])
            feats.append(torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1))
    return torch.cat(feats)


def classify(model, preprocess, tokenizer, task_dir: Path, batch_size: int) -> dict:
    import open_clip

    classnames, templates = read_zeroshot_text(task_dir)
    images, labels = [], []
    for img, cls in _load(task_dir, "cls"):
        images.append(img)
        labels.append(int(cls))
    if not images:
        raise MissingTask(f"{task_dir}: test split is empty")
    with torch.no_grad():
        head = open_clip.build_zero_shot_classifier(
            model, tokenizer=tokenizer, classnames=classnames,
            templates=[(lambda c, t=t: t.format(c=c)) for t in templates],
            num_classes_per_batch=16, device="cpu", use_tqdm=False)
    logits = _image_features(model, preprocess, images, batch_size) @ head.float()
    y = torch.tensor(labels)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    pred = top[:, 0]
    recalls = [float((pred[y == c] == c).float().mean()) for c in range(len(classnames)) if (y == c).any()]
    return {"acc1": float((pred == y).float().mean()), "acc5": float((top == y[:, None]).any(1).float().mean()),
            "mean_per_class_recall": float(np.mean(recalls)), "n": len(labels), "classes": len(classnames)}


def retrieve(model, preprocess, tokenizer, task_dir: Path, batch_size: int) -> dict:
    images, captions, owner = [], [], []
    for img, txt in _load(task_dir, "txt"):
        caps = [c for c in (txt if isinstance(txt, str) else txt.decode()).split("\n") if c.strip()]
        owner += [len(images)] * len(caps)
        captions += caps
        images.append(img)
    if not images:
        raise MissingTask(f"{task_dir}: test split is empty")
    img = _image_features(model, preprocess, images, batch_size)
    with torch.no_grad():
        txt = torch.cat([torch.nn.functional.normalize(model.encode_text(tokenizer(captions[i: i + batch_size])).float(), dim=-1)
                         for i in range(0, len(captions), batch_size)])
    sim = txt @ img.T                       # captions x images
    owner_t = torch.tensor(owner)
    out = {}
    for k in (1, 5, 10):
        kk = min(k, sim.shape[1])
        out[f"image_retrieval_recall@{k}"] = float((sim.topk(kk, dim=1).indices == owner_t[:, None]).any(1).float().mean())
        kt = min(k, sim.shape[0])
        hits = sim.T.topk(kt, dim=1).indices    # images -> caption indices
        out[f"text_retrieval_recall@{k}"] = float((owner_t[hits] == torch.arange(len(images))[:, None]).any(1).float().mean())
    out["mean_recall@1"] = (out["image_retrieval_recall@1"] + out["text_retrieval_recall@1"]) / 2
    out["n"] = len(images)
    return out


def evaluate_suite(model, preprocess, tokenizer, suite: Suite, data_root: str, results_path: str,
                   batch_size: int = 128) -> list[dict]:
    """Evaluate every task not already in ``results_path``; append one JSON line per task."""
    path = local(results_path)
    done = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["key"]] = r
    rows = []
    for task in tqdm(suite.tasks, desc="evaluate", unit="task"):
        if task.key in done:
            rows.append(done[task.key])
            continue
        task_dir = local(data_root) / task.key
        try:
            fn = classify if task.type == "zeroshot_classification" else retrieve
            metrics = fn(model, preprocess, tokenizer, task_dir, batch_size)
            row = {"key": task.key, "name": task.name, "group": task.group, "main_metric": task.main_metric,
                   "main": metrics.get(task.main_metric), "metrics": metrics, "status": "ok"}
            if task.main_metric and task.main_metric not in metrics:   # never a silent gap in the average
                row.update(status="unsupported_metric", reason=f"main metric {task.main_metric} is not computed yet")
        except MissingTask as exc:
            row = {"key": task.key, "name": task.name, "group": task.group, "main_metric": task.main_metric,
                   "main": None, "metrics": {}, "status": "missing", "reason": str(exc)}
        rows.append(row)
        if row["status"] == "ok":   # only finished tasks are recorded, so a re-run retries the rest
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
    return rows


def summarize(rows: list[dict]) -> dict:
    """DataComp aggregation: unweighted mean of main metrics, group means; missing tasks listed."""
    scored = [r for r in rows if r["status"] == "ok" and r["main"] is not None and math.isfinite(r["main"])]
    groups: dict[str, list[float]] = {}
    for r in scored:
        groups.setdefault(r["group"], []).append(r["main"])
    return {
        "average": float(np.mean([r["main"] for r in scored])) if scored else None,
        "groups": {g: float(np.mean(v)) for g, v in groups.items()},
        "tasks": {r["key"]: r["main"] for r in scored},
        "missing": [r["key"] for r in rows if r["status"] != "ok"],
        "num_tasks": len(rows), "num_scored": len(scored),
    }


def write_summary(summary: dict, path: str) -> None:
    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")



