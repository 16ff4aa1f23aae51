"""Runs side by side, from MLflow: one row per trained-and-evaluated model, newest first, with its
recipe, scale, DVC experiment, subset size, samples seen, the ImageNet-group score, group means
and the average. Read-only: it never creates a run.

Rows come from the pipeline parent runs (winnow.track) that the report stage finished: an
execution whose stages DVC all skipped evaluates the same model again, so a model (its checkpoint
hash, tag ``winnow.model``) evaluated on one suite is one row, its newest execution.

    python -m winnow compare            # prints the table, writes reports/compare/runs.md
"""
from __future__ import annotations

from pathlib import Path

from winnow import track
from winnow.io import atomic_file


def runs_table(tracking_uri: str, experiment: str, limit: int = 50, current: str | None = None) -> list[dict]:
    """Rows of FINISHED parent runs with a headline, newest first; ``current`` (the run being
    reported, still running) is listed too."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).exists():
        return []       # no store yet: reading one must not create it
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`winnow.kind` = 'pipeline'",
                              max_results=5000, order_by=["attributes.start_time DESC"])
    rows, seen = [], set()
    for r in runs:
        m, p, t = r.data.metrics, r.data.params, r.data.tags
        score = m.get("average", m.get("partial_average"))
        if score is None or (r.info.status != "FINISHED" and r.info.run_id != current):   # failed, or not evaluated
            continue
        model = (t.get("winnow.model") or r.info.run_id, p.get("eval.suite"))
        if model in seen:
            continue
        seen.add(model)
        rows.append({
            "run": r.info.run_name, "run_id": r.info.run_id[:8], "recipe": p.get("recipe") or "?",
            "scale": p.get("scale"), "experiment": t.get("winnow.dvc_experiment"),
            "subset_size": _int(m.get("subset_size")), "samples_seen": _int(m.get("samples_seen")),
            "kept_fraction": m.get("kept_fraction"), "imagenet": m.get("group.ImageNet"),
            "groups": {k.removeprefix("group."): v for k, v in m.items() if k.startswith("group.")},
            "average": score, "partial": "average" not in m,   # partial: some ranked tasks missing
            "comparable": t.get(track.COMPARABLE_TAG),
        })
        if len(rows) >= limit:
            break
    return rows


def _int(v) -> int | None:
    return None if v is None else int(v)


def baseline(rows: list[dict], scale: str | None, exclude: str | None = None, comparable: str | None = None) -> dict | None:
    """The newest no_filter row at ``scale`` (not the run ``exclude``) measured on the same pool,
    evaluation and training (``comparable``, track.comparable; None: any): what Δ is measured against."""
    return next((r for r in rows if r["recipe"] == "no_filter" and r["scale"] == scale and r["run_id"] != exclude
                 and (comparable is None or r.get("comparable") == comparable)
                 and r["average"] is not None and not r.get("partial")), None)


def to_markdown(rows: list[dict]) -> str:
    groups = sorted({g for r in rows for g in r["groups"]})
    head = ["run", "recipe", "scale", "experiment", "subset size", "samples seen"] + groups + ["average"]
    fmt = lambda v: "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['run']} ({r['run_id']})", r["recipe"], r.get("scale"), r.get("experiment"), r["subset_size"],
                 r["samples_seen"]]
        cells += [r["groups"].get(g) for g in groups]
        lines.append("| " + " | ".join(fmt(c) for c in cells) + f" | {fmt(r['average'])}{' (partial)' * r.get('partial', False)} |")
    return "\n".join(lines) + "\n"


def write(rows: list[dict], path: str = "reports/compare/runs.md") -> str:
    text = "# Runs compared (newest first)\n\n" + (to_markdown(rows) if rows else "No evaluated runs yet.\n")
    with atomic_file(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return text
