"""Zero-shot evaluation on a task suite stored in the DataComp / clip_benchmark webdataset layout.

Classification: a zero-shot head from class names x templates (open_clip's builder); metrics in
winnow.metrics (acc1/acc5, mean per-class recall, macro F1, worst-group accuracy from ``.npy``
metadata). Retrieval: recall@k both ways; the main metric is mean_recall@1, as DataComp reports it.
Association (WinoGAViL): Jaccard of the top candidates. Results append per task to ``results.jsonl``; a re-run
skips tasks already there. A task whose data is absent is reported missing, never scored zero.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from winnow import metrics as M
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


def _samples(task_dir: Path, split: str = "test"):
    """Decoded webdataset samples (dicts keyed by member suffix) of one split."""
    import webdataset as wds

    return wds.WebDataset(_split_urls(task_dir, split), shardshuffle=False).decode("pil")


def _image(sample: dict):
    for k in ("jpg", "png", "jpeg", "webp"):
        if k in sample:
            return sample[k]
    raise MissingTask(f"sample {sample.get('__key__')} has no image")


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


def classify(model, preprocess, tokenizer, task_dir: Path, batch_size: int, groups=None) -> dict:
    """Zero-shot classification; with ``groups`` (a tasks.Groups), worst-group accuracy from each
    sample's ``.npy`` metadata row."""
    import open_clip

    classnames, templates = read_zeroshot_text(task_dir)
    images, labels, meta = [], [], []
    for sample in _samples(task_dir):
        images.append(_image(sample))
        labels.append(int(sample["cls"]))
        if groups is not None:
            if "npy" not in sample:
                raise MissingTask(f"{task_dir}: sample {sample['__key__']} has no .npy metadata for worst-group accuracy")
            meta.append(int(np.asarray(sample["npy"]).reshape(-1)[groups.field]))
    if not images:
        raise MissingTask(f"{task_dir}: test split is empty")
    with torch.no_grad():
        head = open_clip.build_zero_shot_classifier(
            model, tokenizer=tokenizer, classnames=classnames,
            templates=[(lambda c, t=t: t.format(c=c)) for t in templates],
            num_classes_per_batch=16, device="cpu", use_tqdm=False)
    logits = (_image_features(model, preprocess, images, batch_size) @ head.float()).numpy()
    out = M.classification_metrics(logits, np.array(labels), np.array(meta) if groups is not None else None,
                                   groups.exclude if groups else (), groups.suffix if groups else "wg")
    return out | {"n": len(labels), "classes": len(classnames)}


def associate(model, preprocess, tokenizer, task_dir: Path, batch_size: int) -> dict:
    """WinoGAViL: per sample a ``json`` {cue, candidates, associations} and candidate images
    ``<i>.jpg``; the cue is prompted as DataComp does ("A/An <cue>")."""
    scores, truths = [], []
    with torch.no_grad():
        for sample in _samples(task_dir):
            spec = sample["json"]
            cands = spec["candidates"]
            imgs = [sample[f"{i}.jpg"] for i in range(len(cands))]
            cue = spec["cue"].lower()
            prompt = f"{'An' if cue[:1] in 'aeiou' else 'A'} {cue}"
            txt = torch.nn.functional.normalize(model.encode_text(tokenizer([prompt])).float(), dim=-1)
            img = _image_features(model, preprocess, imgs, batch_size)
            scores.append((txt @ img.T).squeeze(0).numpy())
            truths.append(np.isin(cands, spec["associations"]))
    if not scores:
        raise MissingTask(f"{task_dir}: test split is empty")
    return M.winogavil_metrics(scores, truths)


def retrieve(model, preprocess, tokenizer, task_dir: Path, batch_size: int) -> dict:
    images, captions, owner = [], [], []
    for sample in _samples(task_dir):
        img, txt = _image(sample), sample["txt"]
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
                   batch_size: int = 128, model_id: str = "") -> list[dict]:
    """Evaluate every task not already in ``results_path`` for this ``model_id``; append one JSON
    line per finished task, so a killed evaluation resumes. Lines of another model are dropped."""
    path = local(results_path)
    done = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                if r.get("model_id", "") == model_id:
                    done[r["key"]] = r
        with atomic_file(path) as tmp:
            Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in done.values()), encoding="utf-8")
    rows = []
    for task in tqdm(suite.tasks, desc="evaluate", unit="task"):
        if task.key in done:
            rows.append(done[task.key])
            continue
        task_dir = local(data_root) / task.key
        try:
            if task.type == "zeroshot_classification":
                metrics = classify(model, preprocess, tokenizer, task_dir, batch_size, task.groups)
            else:
                fn = retrieve if task.type == "retrieval" else associate
                metrics = fn(model, preprocess, tokenizer, task_dir, batch_size)
            row = {"key": task.key, "name": task.name, "group": task.group, "main_metric": task.main_metric,
                   "main": metrics.get(task.main_metric), "metrics": metrics, "status": "ok", "model_id": model_id}
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



