"""Zero-shot evaluation of a CLIP model on a task suite, streamed at real size.

Where a suite's sets live and how they are read is ``winnow.tasks`` (``demo`` or ``datacomp``
layout, allowlisted tar decoding, quarantine). Here each task's split is streamed in batches —
decoded and preprocessed in DataLoader workers (``workers``) — through the model on ``device``
(CUDA: bf16 autocast; CPU: fp32), keeping per sample only what the metrics need: the top-5 classes
(classification), features (retrieval), a candidate's score (WinoGAViL), one class per objective
(FairFace). Peak memory does not grow with a set's size beyond those.

Classification: a zero-shot head from class names x templates (open_clip's builder; the templates
are ``{c}`` format strings); metrics in winnow.metrics (acc1/acc5, mean per-class recall, macro F1,
worst-group accuracy from ``.npy`` metadata). Retrieval: recall@k both ways, main metric
mean_recall@1 as DataComp reports it. Association (WinoGAViL): Jaccard of the top candidates, the
cue prompted "A/An <cue>". FairFace / UTKFace: DataComp's fairness evaluation, no main metric.

Resume: evaluation is a job (winnow.jobs) whose units are the tasks, keyed by the checkpoint
(``model_id``), the precision and the code; each task also by its registry entry and its set's
fingerprint — so a re-run skips exactly the tasks whose keys are unchanged, and a changed set,
model or metric code re-evaluates. ``results.jsonl`` is an output, written whole at the end. A task
whose data is absent is reported missing, never scored zero.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from winnow import metrics as M
from winnow.io import atomic_file, local
from winnow.jobs import Key, WorkDir, digest
from winnow.tasks import (  # noqa: F401  (re-exported: embed_targets and stage.py import them from here)
    Batch, MissingTask, Suite, Task, TaskData, fingerprint, iter_samples, iter_split, read_zeroshot_text, task_data,
)


# ---------------------------------------------------------------------------------------------
# device and precision

def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU; else the named device."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"eval.device is '{device}' but no CUDA device is available (use auto or cpu)")
    return d


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 (no autocast) anywhere else."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def precision(device: torch.device) -> str:
    return "bf16" if device.type == "cuda" else "fp32"


class Runner:
    """The model's encoders on one device; outputs are L2-normalised float32 on that device."""

    def __init__(self, model, tokenizer, device: str | torch.device = "auto"):
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer

    @torch.no_grad()
    def images(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        with autocast(self.device):
            f = self.model.encode_image(x)
        return torch.nn.functional.normalize(f.float(), dim=-1)

    @torch.no_grad()
    def texts(self, strings: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(strings).to(self.device, non_blocking=True)
        with autocast(self.device):
            f = self.model.encode_text(tokens)
        return torch.nn.functional.normalize(f.float(), dim=-1)

    @torch.no_grad()
    def head(self, classnames: list[str], templates: list[str]) -> torch.Tensor:
        """Zero-shot weights (d x classes): per class the normalised mean of its normalised prompts."""
        import open_clip

        with autocast(self.device):
            w = open_clip.build_zero_shot_classifier(
                self.model, tokenizer=self.tokenizer, classnames=classnames,
                templates=[(lambda c, t=t: t.format(c=c)) for t in templates],
                num_classes_per_batch=16, device=self.device, use_tqdm=False)
        return w.float()


# ---------------------------------------------------------------------------------------------
# per task type

class _Reader:
    """One task's batches, with the quarantine and skipped members counted on the way."""

    def __init__(self, task: Task, data_root: str, layout: str, transform, batch_size: int, workers: int,
                 pin: bool, kind: str | None = None):
        self.quarantined: list[tuple[str, str]] = []
        self.skipped_members = 0
        self.batches = iter_split(task, data_root, "test", transform, batch_size, workers, layout, kind, pin)

    def __iter__(self):
        for b in self.batches:
            self.quarantined += b.quarantined
            self.skipped_members += b.skipped_members
            if b.keys:
                yield b

    def empty(self, path, what: str = "test split is empty") -> MissingTask:
        """The error of a split that yielded nothing, with what the quarantine took: a set whose
        every image failed (moved `datasets` cache files, all corrupt) is named as such."""
        if self.quarantined:
            q = self.info(0)
            what += (f": all {q['quarantined']} samples were quarantined ({q['quarantine_reasons']}, "
                     f"e.g. {q['quarantine_examples'][:3]})")
        return MissingTask(f"{path}: {what}")

    def info(self, n: int) -> dict:
        reasons: dict[str, int] = {}
        for _, r in self.quarantined:
            reasons[r] = reasons.get(r, 0) + 1
        q = len(self.quarantined)
        return {"quarantined": q, "quarantine_share": q / (n + q) if n + q else 0.0, "quarantine_reasons": reasons,
                "quarantine_examples": [f"{k} ({r})" for k, r in self.quarantined[:5]],
                "skipped_members": self.skipped_members}


def classify(runner: Runner, task: Task, data: TaskData, reader: _Reader) -> dict:
    classnames, templates = read_zeroshot_text(data.path)
    head = runner.head(classnames, templates)
    tops, labels, groups = [], [], []
    for b in reader:
        logits = (runner.images(b.images) @ head).cpu().numpy()
        tops.append(M.topk(logits, 5))
        labels.append(b.labels)
        if task.groups is not None:
            groups.append(np.array([int(m[task.groups.field]) for m in b.meta]))
    if not tops:
        raise reader.empty(data.path)
    y = np.concatenate(labels)
    if y.min() < 0 or y.max() >= len(classnames):   # a label no class name stands for: the set is inconsistent
        raise MissingTask(f"{data.path}: labels run {int(y.min())}..{int(y.max())}, but classnames.txt names "
                          f"{len(classnames)} classes")
    g = task.groups
    out = M.classification_metrics_from_topk(np.concatenate(tops), y,
                                             np.concatenate(groups) if g is not None else None,
                                             g.exclude if g else (), g.suffix if g else "wg")
    return out | {"n": int(sum(len(x) for x in labels)), "classes": len(classnames)}


def retrieve(runner: Runner, task: Task, data: TaskData, reader: _Reader, batch_size: int) -> dict:
    """Captions are encoded in batches of ``batch_size`` in sample order (as one list would be)."""
    img, txt, owner, pending, n = [], [], [], [], 0
    for b in reader:
        img.append(runner.images(b.images).cpu())
        for caps in b.captions:
            owner += [n] * len(caps)
            pending += caps
            n += 1
        while len(pending) >= batch_size:
            txt.append(runner.texts(pending[:batch_size]).cpu())
            pending = pending[batch_size:]
    if pending:
        txt.append(runner.texts(pending).cpu())
    if not img or not txt:
        raise reader.empty(data.path, "test split is empty or has no captions")
    return M.retrieval_metrics(torch.cat(img), torch.cat(txt), owner) | {"n": n, "captions": len(owner)}


def _prompt(cue: str) -> str:
    """wino_eval.py's get_clip_prompt."""
    cue = cue.lower()
    return f"{'An' if cue[:1] in 'aeiou' else 'A'} {cue}"


def associate(runner: Runner, task: Task, data: TaskData, reader: _Reader) -> dict:
    scores, truths = [], []
    for b in reader:
        f = runner.images(b.images)
        t = runner.texts([_prompt(c) for c in b.cues])
        start = 0
        for i, size in enumerate(b.sizes):
            scores.append((t[i: i + 1] @ f[start: start + size].T).squeeze(0).cpu().numpy())
            start += size
        truths += b.truths
    if not scores:
        raise reader.empty(data.path)
    return M.winogavil_metrics(scores, truths)


def fairface(runner: Runner, task: Task, data: TaskData, reader: _Reader) -> dict:
    """fairness_eval.py: classnames and templates are '<objective>:<text>'; one head per objective."""
    classnames, templates = read_zeroshot_text(data.path)
    per: dict[str, dict[str, list[str]]] = {o: {"names": [], "templates": []} for o in M.FAIRFACE_OBJECTIVES}
    for kind, lines in (("names", classnames), ("templates", templates)):
        for line in lines:
            objective, text = line.split(":", 1) if ":" in line else ("", line)
            if objective in per:
                per[objective][kind].append(text)
    lacking = [o for o, v in per.items() if not v["names"] or not v["templates"]]
    if lacking:
        raise MissingTask(f"{data.path}: no '<objective>:' class names or templates for {lacking}")
    heads = [runner.head(per[o]["names"], per[o]["templates"]) for o in M.FAIRFACE_OBJECTIVES]
    preds, meta = [], []
    for b in reader:
        f = runner.images(b.images)
        preds.append(torch.stack([(f @ h).argmax(1) for h in heads], 1).cpu().numpy())
        meta += b.meta
    if not preds:
        raise reader.empty(data.path)
    rows = {len(m) for m in meta}
    if min(rows) < len(M.FAIRFACE_FIELDS):
        raise MissingTask(f"{data.path}: .npy metadata rows have {sorted(rows)} fields, FairFace needs {M.FAIRFACE_FIELDS}")
    return M.fairface_metrics(np.concatenate(preds), np.stack([m[: len(M.FAIRFACE_FIELDS)] for m in meta]))


# ---------------------------------------------------------------------------------------------
# the suite, resumable

def task_key(task: Task, data: TaskData, data_root: str) -> str:
    """A task's own inputs: its registry entry and its set's content (fingerprint: content hashes of
    small files — class names, templates —, sizes and mtimes of large ones)."""
    blob = {"task": task.model_dump(mode="json"), "root": str(data_root),
            "data": {"kind": data.kind, "id": data.dataset_id, "fingerprint": fingerprint(data)}}
    return digest(blob)


def evaluate_suite(model, preprocess, tokenizer, suite: Suite, data_root: str, results_path: str,
                   batch_size: int = 128, model_id: str = "", workers: int = 0, device: str = "auto",
                   work_root: str | None = None) -> list[dict]:
    """Evaluate every task of ``suite`` and write the finished ones to ``results_path`` (JSON lines).

    A job (winnow.jobs) whose units are the tasks: its key covers the model (``model_id``), the
    precision and the code (metrics, set readers); each task's own key covers its entry and its
    set's content. A finished task is marked in the work directory (``work_root``, by default
    beside ``results_path``), so a killed or changed evaluation redoes only what is unfinished or
    changed. A task whose data is absent is reported missing, never marked, and retried next time."""
    runner = Runner(model, tokenizer, device)
    prec = precision(runner.device)
    path = local(results_path)
    key = Key("evaluate").params(model=model_id, precision=prec).code(__name__)
    work = WorkDir("evaluate", key, work_root or path.parent / ".eval-work")
    datas = {t.key: task_data(t, data_root, suite.layout) for t in suite.tasks}
    rows = []
    for task in tqdm(suite.tasks, desc="evaluate", unit="task"):
        data, unit = datas[task.key], task.key.replace("/", "__")
        unit_key = task_key(task, data, data_root)
        if (done := work.done(unit, unit_key)) is not None:
            rows.append(done)
            continue
        base = {"key": task.key, "name": task.name, "group": task.group, "main_metric": task.main_metric}
        t0 = time.time()
        try:
            if data.kind == "wds" and not data.path.is_dir():
                raise MissingTask(f"{data.path} does not exist")
            reader = _Reader(task, data_root, suite.layout, preprocess, batch_size, workers, runner.device.type == "cuda")
            if task.type == "zeroshot_classification":
                metrics = classify(runner, task, data, reader)
            elif task.type == "retrieval":
                metrics = retrieve(runner, task, data, reader, batch_size)
            elif task.type == "association":
                metrics = associate(runner, task, data, reader)
            else:
                metrics = fairface(runner, task, data, reader)
            info = reader.info(int(metrics.get("n", 0)))
            row = base | {"main": metrics.get(task.main_metric) if task.main_metric else None, "metrics": metrics,
                          "status": "ok", "model_id": model_id, "eval_key": unit_key, "precision": prec,
                          "seconds": round(time.time() - t0, 2), **info}
            if task.main_metric and task.main_metric not in metrics:   # never a silent gap in the average
                row.update(status="unsupported_metric", reason=f"main metric {task.main_metric} is not computed")
        except MissingTask as exc:
            row = base | {"main": None, "metrics": {}, "status": "missing", "reason": str(exc)}
        rows.append(row)
        if row["status"] == "ok":   # only finished tasks are marked, so a re-run retries the rest
            work.mark(unit, row, unit_key)
    # without wall times and the resume key (it covers the sets' paths and mtimes): the same model and
    # sets give the same bytes in any clone (a DVC output)
    with atomic_file(path) as tmp:
        Path(tmp).write_text("".join(json.dumps({k: v for k, v in r.items() if k not in ("seconds", "eval_key")}) + "\n"
                                     for r in rows if r["status"] == "ok"), encoding="utf-8")
    return rows


def summarize(rows: list[dict]) -> dict:
    """DataComp's aggregation: the unweighted mean of the main metrics and the group means.

    ``average`` is that mean only when every task with a main metric is scored (38 of 38 for
    DataComp, 6 of 6 for the demo); otherwise it is null and ``partial_average`` holds the mean of
    the ``num_scored`` tasks that were, with ``average_label`` saying which it is. Tasks without a
    main metric (FairFace, UTKFace) are outside the average: their metrics are under ``fairness``.
    """
    ranked = [r for r in rows if r.get("main_metric")]
    scored = [r for r in ranked if r["status"] == "ok" and r["main"] is not None and math.isfinite(r["main"])]
    complete = bool(ranked) and len(scored) == len(ranked)
    mean = float(np.mean([r["main"] for r in scored])) if scored else None
    groups: dict[str, list[float]] = {}
    expected: dict[str, int] = {}
    for r in ranked:
        expected[r["group"]] = expected.get(r["group"], 0) + 1
    for r in scored:
        groups.setdefault(r["group"], []).append(r["main"])
    if complete:
        label = f"average of {len(ranked)}"
    elif scored:
        label = f"partial average of {len(scored)} of {len(ranked)} tasks ({len(ranked) - len(scored)} not scored)"
    else:
        label = f"no average: none of {len(ranked)} tasks scored"
    return {
        "average": mean if complete else None,
        "partial_average": mean,
        "average_label": label,
        "complete": complete,
        "groups": {g: float(np.mean(v)) for g, v in groups.items()},
        "groups_scored": {g: f"{len(groups.get(g, []))}/{n}" for g, n in expected.items()},
        "tasks": {r["key"]: r["main"] for r in scored},
        "fairness": {r["key"]: {k: v for k, v in r["metrics"].items() if isinstance(v, (int, float))}
                     for r in rows if not r.get("main_metric") and r["status"] == "ok"},
        "missing": [r["key"] for r in rows if r["status"] != "ok"],
        "num_tasks": len(rows), "num_ranked": len(ranked), "num_scored": len(scored),
        "quarantined": {r["key"]: r["quarantined"] for r in rows if r.get("quarantined")},
    }


def write_summary(summary: dict, path: str) -> None:
    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# compatibility for winnow.embed.embed_targets (moving to iter_split)

def _samples(task_dir: Path, split: str = "test"):
    """Decoded samples of a webdataset split (dicts keyed by member suffix, images as PIL), read
    through the allowlist; MissingTask at once when the split is absent."""
    return iter_samples(Path(task_dir), split)


def _image(sample: dict):
    for k in ("jpg", "png", "jpeg", "webp"):
        if k in sample:
            return sample[k]
    raise MissingTask(f"sample {sample.get('__key__')} has no image")
