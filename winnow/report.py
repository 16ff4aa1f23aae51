"""The run report: ``reports/index.html`` (self-contained: figures inlined as PNG) and
``reports/index.md``, from the stages' outputs. Figures are also saved under ``reports/plots/``;
``reports/plots/*.csv`` feed ``dvc plots``.

Sections: funnel; score histograms with each step's threshold (coloured by true noise kind on
the demo); example images each step dropped and the subset kept; per-step precision/recall
against the demo's truth; scorer quality; per-task and per-group evaluation; earlier runs.
"""
from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from winnow import io as wio
from winnow import plots


@dataclass
class RunData:
    funnel: dict
    summary: dict
    quality: dict
    timings: dict
    decisions: pd.DataFrame | None = None
    truth: pd.DataFrame | None = None
    earlier: list[dict] = field(default_factory=list)


def _read(path) -> dict:
    p = Path(path)
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else {}


def collect(reports: str = "reports", scorer_dir: str = "models/scorer", filter_dir: str = "data/filter",
            pool_dir: str | None = "data/pool", earlier: list[dict] | None = None) -> RunData:
    from winnow.pool.view import Pool

    d = Path(filter_dir) / "decisions.parquet"
    truth = Pool.open(pool_dir).truth_path if pool_dir and Path(pool_dir, "manifest.json").exists() else None
    return RunData(
        funnel=_read(f"{reports}/filter/funnel.json"), summary=_read(f"{reports}/eval/summary.json"),
        quality=_read(f"{scorer_dir}/quality.json"),
        timings={t.stem: json.loads(t.read_text())["wall_s"] for t in sorted(Path(reports, "timings").glob("*.json"))},
        decisions=pd.read_parquet(d) if d.exists() else None,
        truth=pd.read_parquet(wio.source(truth)) if truth else None, earlier=earlier or [])


def _table(header: list[str], rows: list[list], markdown: bool) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows])
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _sections(run: RunData, markdown: bool) -> list[tuple[str, str]]:
    """(title, body) pairs shared by the markdown and HTML reports."""
    f, s, out = run.funnel, run.summary, []
    if f:
        rows = [[st["step"], json.dumps({k: v for k, v in st["params"].items() if k != "name"} | st["state"]),
                 st["kept_after"], st["dropped_here"], st["dropped_standalone"]] for st in f.get("steps", [])]
        intro = (f"Pool: {f.get('pool_size')} samples → kept {f.get('kept_unique')} unique "
                 f"({100 * f.get('kept_fraction', 0):.1f}%), subset with repeats: {f.get('subset_size')}.")
        if dl := f.get("download"):   # DataComp's download layout: link rot is normal, and shown
            intro += (f" Not downloaded: {dl['not_downloaded']} of {dl['pool_rows']} metadata rows have no image; "
                      f"{dl['kept_without_image']} kept samples have none, so reshard cannot write them.")
        if f.get("quarantined_shards"):
            intro += f" Quarantined shards: {', '.join(q['shard'] for q in f['quarantined_shards'])}."
        out.append(("Funnel", intro + "\n\n" + _table(["step", "params", "kept after", "dropped here", "dropped standalone"], rows, markdown)))
    truth = f.get("truth")
    if truth:
        kinds = sorted(next(iter(truth.values())).keys())
        rows = [[lab] + [f"{v[k]['recall']:.2f} / {v[k]['precision']:.2f}" for k in kinds] for lab, v in truth.items()]
        out.append(("What each step removed, against the demo's ground truth",
                    "Recall: share of each noise kind the step drops on its own (for clean: collateral loss). "
                    "Precision: share of the step's drops that are of that kind.\n\n"
                    + _table(["step"] + [f"{k} R / P" for k in kinds], rows, markdown)))
    if run.quality:
        out.append(("Scoring CLIP (held-out demo pairs)", _table(["measure", "value"], [[k, v] for k, v in run.quality.items()], markdown)))
    if s:
        rows = [[k, v] for k, v in s.get("tasks", {}).items()] + [[f"group: {g}", v] for g, v in s.get("groups", {}).items()]
        label = s.get("average_label", "average")   # DataComp's average only when every ranked task is scored
        rows.append([label, s.get("average") if s.get("average") is not None else s.get("partial_average")])
        body = _table(["task", "main metric"], rows, markdown)
        if s.get("missing"):
            body += f"\n\nMissing tasks (not scored): {', '.join(s['missing'])}"
        if s.get("fairness"):   # FairFace / UTKFace: DataComp's fairness evaluation, outside the average
            body += "\n\nFairness (outside the average):\n\n" + _table(
                ["task", "metric", "value"], [[t, k, v] for t, m in s["fairness"].items() for k, v in m.items()], markdown)
        out.append(("Evaluation", body))
    if run.earlier:
        from winnow.compare import to_markdown

        if markdown:
            out.append(("Earlier runs", to_markdown(run.earlier)))
        else:
            rows = [[f"{r['run']} ({r['run_id']})", r["recipe"], r["subset_size"], r["samples_seen"], r["imagenet"], r["average"]]
                    for r in run.earlier]
            out.append(("Earlier runs", _table(["run", "recipe", "subset size", "samples seen", "ImageNet group", "average"], rows, False)))
    if run.timings:
        out.append(("Stage wall time (last run of each stage)", _table(["stage", "seconds"], [[k, v] for k, v in run.timings.items()], markdown)))
    return out


def build_markdown(run: RunData) -> str:
    title = f"# winnow run report — recipe `{run.funnel.get('recipe', '?')}`\n"
    return title + "".join(f"\n## {t}\n\n{b}\n" for t, b in _sections(run, markdown=True))


def _load_images(pool_dir: str, uids: set[str], max_shards: int = 3) -> dict[str, object]:
    """Images of the wanted uids from the first shards of the pool (a sample is enough for grids)."""
    from winnow.pool import shards
    from winnow.pool.view import Pool

    pool = Pool.open(pool_dir)
    found = {}
    for shard in pool.all_image_shards()[:max_shards]:
        for s in shards.iter_tar(pool.images_uri, shard):
            uid = s["json"].get("uid")
            if uid in uids and s.get("jpg"):
                try:
                    found[uid] = (shards.decode_image(s["jpg"]), s.get("txt") or "")
                except ValueError:
                    continue
        if len(found) == len(uids):
            break
    return found


def figures(run: RunData, pool_dir: str | None, per_grid: int = 12, seed: int = 0) -> list[tuple[str, str, bytes]]:
    """(file stem, caption, PNG) for every figure of the report."""
    f, s, figs = run.funnel, run.summary, []
    if f:
        figs.append(("funnel", "Samples kept after each step", plots.funnel(f["steps"], f["pool_size"], f["subset_size"])))
    d = run.decisions
    kinds = None
    if d is not None and run.truth is not None:
        d = d.merge(run.truth[["uid", "kind"]], on="uid", how="left")
        kinds = d["kind"].to_numpy(dtype=object)
    if d is not None and f:
        for st in f["steps"]:
            for col in [c for c in d.columns if c.endswith(f":{st['step']}") and not c.startswith(("keep:",))]:
                thr = st["state"].get("threshold") if col.startswith("score:") else None
                figs.append((f"hist_{col.replace(':', '_')}", f"{col} with the step's threshold",
                             plots.histogram(d[col].to_numpy(), kinds, f"{col} (step {st['step']})", thr)))
    if d is not None and pool_dir and f:
        rng = np.random.default_rng(seed)
        first = set(sorted(d["shard"].unique())[:3])
        local = d[d["shard"].isin(first)]
        picks = []
        for st in f["steps"]:
            idx = np.flatnonzero((local["dropped_by"] == st["step"]).to_numpy())
            picks.append((f"dropped_{st['step']}", f"Dropped by {st['step']}", local.iloc[rng.permutation(idx)[:per_grid]]))
        idx = np.flatnonzero((local["multiplicity"] > 0).to_numpy())
        picks.append(("kept", "Kept in the subset", local.iloc[rng.permutation(idx)[:per_grid]]))
        wanted = set().union(*[set(p[2]["uid"]) for p in picks])
        images = _load_images(pool_dir, wanted) if wanted else {}
        for stem, title, rows in picks:
            rows = rows[rows["uid"].isin(images)]
            if len(rows):
                figs.append((f"grid_{stem}", title, plots.image_grid(
                    [images[u][0] for u in rows["uid"]], [images[u][1] for u in rows["uid"]],
                    list(rows["kind"]) if "kind" in rows else [None] * len(rows), title)))
    if s.get("tasks"):
        figs.append(("eval_tasks", "Main metric per task", plots.bars(list(s["tasks"]), list(s["tasks"].values()), "Per task")))
        avg = s.get("average") if s.get("average") is not None else s.get("partial_average")
        names, values = list(s["groups"]), list(s["groups"].values())
        if avg is not None:
            names.append("average" if s.get("average") is not None else f"partial average ({s.get('num_scored')} tasks)")
            values.append(avg)
        figs.append(("eval_groups", "Group means and average", plots.bars(names, values, "Per group")))
    if run.earlier:
        labels = [f"{r['run']} · {r['recipe']}" for r in run.earlier if r["average"] is not None][:15]
        avgs = [r["average"] for r in run.earlier if r["average"] is not None][:15]
        if avgs:
            figs.append(("earlier_runs", "Average score of this and earlier runs", plots.runs_chart(labels, avgs)))
    return figs


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em}td,th{border:1px solid #ccc;padding:3px 7px}
th{background:#f3f3f3}figure{margin:1em 0}figcaption{font-size:.85em;color:#555}img{max-width:100%}"""
# Marks the page when every image has loaded (used by the headless-browser test).
_CHECK = """<script>window.addEventListener('load',()=>{const b=[...document.images].filter(i=>!i.complete||i.naturalWidth===0);
document.body.dataset.images=document.images.length;document.body.dataset.brokenImages=b.length;});</script>"""


def build_html(run: RunData, figs: list[tuple[str, str, bytes]]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>winnow report</title><style>{_CSS}</style>{_CHECK}</head><body>",
             f"<h1>winnow run report — recipe <code>{html.escape(str(run.funnel.get('recipe', '?')))}</code></h1>"]
    fig_by_section = {"Funnel": ["funnel", "hist_", "grid_"], "Evaluation": ["eval_"], "Earlier runs": ["earlier_"]}
    for title, body in _sections(run, markdown=False):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append("".join(f"<p>{html.escape(p)}</p>" if not p.startswith("<table") else p for p in body.split("\n\n")))
        for stem, caption, png in figs:
            if any(stem.startswith(prefix) for prefix in fig_by_section.get(title, [])):
                data = base64.b64encode(png).decode("ascii")
                parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                             f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def dvc_plot_data(run: RunData) -> dict[str, pd.DataFrame]:
    """Tables for ``dvc plots``: the funnel and the per-task scores."""
    out = {}
    if run.funnel:
        out["funnel"] = pd.DataFrame([{"step": "pool", "kept": run.funnel["pool_size"]}] +
                                     [{"step": s["step"], "kept": s["kept_after"]} for s in run.funnel["steps"]])
    if run.summary.get("tasks"):
        out["eval"] = pd.DataFrame([{"task": k, "score": v} for k, v in run.summary["tasks"].items()])
    return out
