"""The run report: ``reports/index.html`` (self-contained: figures inlined as PNG) and
``reports/index.md``, from the stages' outputs. Figures are also saved under ``reports/plots/``;
``reports/plots/*.csv`` feed ``dvc plots``.

Sections: funnel; score histograms with each step's threshold (coloured by true noise kind on
the demo); example images each step dropped and the subset kept; per-step precision/recall
against the demo's truth; scorer quality; per-task and per-group evaluation; earlier runs.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from jinja2 import Environment, PackageLoader, select_autoescape

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
    provenance: dict = field(default_factory=dict)   # date, commit, DVC experiment, MLflow run, scale, pool source
    description: str = ""                            # the recipe's own description
    baseline: dict | None = None                     # the latest no_filter run at this scale (compare row), for Δ
    ablation: dict = field(default_factory=dict)     # reports/compare/ablation.json (winnow.ablation), when run


def _read(path) -> dict:
    p = Path(path)
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else {}


DECISIONS_ROWS = 1_000_000     # the report's histograms and grids read at most about this many rows


def read_decisions(path, max_rows: int = DECISIONS_ROWS) -> pd.DataFrame:
    """decisions.parquet, whole when it is small; past ``max_rows``, every k-th row group (row groups
    are in shard order, so the first shards, which the grids show, are always among them) — the
    report never holds a pool-sized table."""
    f = pq.ParquetFile(path)
    if f.metadata.num_rows <= max_rows:
        return f.read().to_pandas()
    step = -(-f.metadata.num_rows // max_rows)
    return f.read_row_groups(list(range(0, f.num_row_groups, step))).to_pandas()


def collect(reports: str = "reports", scorer_dir: str = "models/scorer", filter_dir: str = "data/filter",
            pool_dir: str | None = "data/pool", earlier: list[dict] | None = None) -> RunData:
    from winnow.pool.view import Pool

    d = Path(filter_dir) / "decisions.parquet"
    truth = Pool.open(pool_dir).truth_path if pool_dir and Path(pool_dir, "manifest.json").exists() else None
    return RunData(
        funnel=_read(f"{reports}/filter/funnel.json"), summary=_read(f"{reports}/eval/summary.json"),
        quality=_read(f"{scorer_dir}/quality.json"),
        timings={t.stem: json.loads(t.read_text())["wall_s"] for t in sorted(Path(reports, "timings").glob("*.json"))},
        decisions=read_decisions(d) if d.exists() else None,
        truth=pd.read_parquet(wio.source(truth)) if truth else None, earlier=earlier or [],
        ablation=_read(f"{reports}/compare/ablation.json"))


@dataclass
class Table:
    header: list[str]
    rows: list[list]


def _cell(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))


def sig3(v) -> str:
    """A parameter value for people: floats to 3 significant digits, containers item by item."""
    if isinstance(v, bool) or v is None:
        return str(v).lower() if isinstance(v, bool) else "null"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={sig3(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(sig3(x) for x in v) + "]"
    return str(v)


def _signed(v: float) -> str:
    return f"{v:+.3f}"


def _headline_rows(run: RunData) -> list[list]:
    """What the run is: its provenance, then Δ against the latest no_filter run at the same scale."""
    rows = [[k, v] for k, v in run.provenance.items() if v not in (None, "")]
    b, s = run.baseline, run.summary
    if b and b.get("average") is not None and s.get("average") is not None:
        rows.append([f"Δ average vs no_filter ({b['run']}, {b['run_id']})", _signed(s["average"] - b["average"])])
        if b.get("imagenet") is not None and s.get("groups", {}).get("ImageNet") is not None:
            rows.append(["Δ ImageNet group vs no_filter", _signed(s["groups"]["ImageNet"] - b["imagenet"])])
    return rows


def _markdown_table(t: Table) -> str:
    lines = ["| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
    return "\n".join(lines + ["| " + " | ".join(_cell(v) for v in r) + " |" for r in t.rows])


def _sections(run: RunData, markdown: bool) -> list[tuple[str, list[str | Table]]]:
    """(title, blocks) pairs shared by the markdown and HTML reports; a block is a paragraph or a table."""
    f, s, out = run.funnel, run.summary, []
    if run.provenance or run.description:
        blocks: list = [run.description] if run.description else []
        out.append(("Run", blocks + [Table(["field", "value"], _headline_rows(run))]))
    if f:
        rows = [[st["step"], sig3({k: v for k, v in st["params"].items() if k != "name"} | st["state"]),
                 st["kept_after"], st["dropped_here"], st["dropped_standalone"]] for st in f.get("steps", [])]
        intro = (f"Pool: {f.get('pool_size')} samples → kept {f.get('kept_unique')} unique "
                 f"({100 * f.get('kept_fraction', 0):.1f}%), subset with repeats: {f.get('subset_size')}.")
        if dl := f.get("download"):   # DataComp's download layout: link rot is normal, and shown
            intro += (f" Not downloaded: {dl['not_downloaded']} of {dl['pool_rows']} metadata rows have no image; "
                      f"{dl['kept_without_image']} kept samples have none, so reshard cannot write them.")
        if f.get("quarantined_shards"):
            intro += f" Quarantined shards: {', '.join(q['shard'] for q in f['quarantined_shards'])}."
        out.append(("Funnel", [intro, Table(["step", "params", "kept after", "dropped here", "dropped standalone"], rows)]))
    truth = f.get("truth")
    if truth:
        kinds = sorted(next(iter(truth.values())).keys())
        order = [st["step"] for st in f.get("steps", [])]   # the recipe's order, then the whole recipe
        labels = sorted(truth, key=lambda lab: (order.index(lab) if lab in order else len(order), lab))
        rows = [[lab] + [f"{truth[lab][k]['recall']:.2f} / {truth[lab][k]['precision']:.2f}" for k in kinds]
                for lab in labels]
        out.append(("What each step removed, against the demo's ground truth", [
            "Recall: share of each noise kind the step drops on its own (for clean: collateral loss). "
            "Precision: share of the step's drops that are of that kind.",
            Table(["step"] + [f"{k} R / P" for k in kinds], rows)]))
    if run.quality:
        out.append(("Scoring CLIP (held-out demo pairs)", [Table(["measure", "value"], [[k, v] for k, v in run.quality.items()])]))
    if s:
        rows = [[k, v] for k, v in s.get("tasks", {}).items()] + [[f"group: {g}", v] for g, v in s.get("groups", {}).items()]
        label = s.get("average_label", "average")   # DataComp's average only when every ranked task is scored
        rows.append([label, s.get("average") if s.get("average") is not None else s.get("partial_average")])
        blocks = [Table(["task", "main metric"], rows)]
        if s.get("missing"):
            blocks.append(f"Missing tasks (not scored): {', '.join(s['missing'])}")
        if s.get("fairness"):   # FairFace / UTKFace: DataComp's fairness evaluation, outside the average
            blocks += ["Fairness (outside the average):", Table(
                ["task", "metric", "value"], [[t, k, v] for t, m in s["fairness"].items() for k, v in m.items()])]
        out.append(("Evaluation", blocks))
    if run.earlier:
        from winnow.compare import to_markdown

        if markdown:   # the markdown table also has a column per evaluation group
            out.append(("Earlier runs", [to_markdown(run.earlier)]))
        else:
            rows = [[f"{r['run']} ({r['run_id']})", r["recipe"], r.get("scale"), r.get("experiment"), r["subset_size"],
                     r["samples_seen"], r["imagenet"], r["average"]] for r in run.earlier]
            out.append(("Earlier runs", [Table(["run", "recipe", "scale", "experiment", "subset size", "samples seen",
                                                "ImageNet group", "average"], rows)]))
    if run.ablation.get("rows"):
        a = run.ablation

        def cell(st):
            return f"{st['mean']:.3f} ± {st['std']:.3f}" if st else "—"
        rows = [[r["part"], r["variant"], "/".join(map(str, r["subset_size"])), len(r["seeds"]), cell(r["average"]),
                 cell(r["imagenet"]), "—" if r["delta"] is None else f"{r['delta']:+.3f}",
                 {True: "yes", False: "no", None: "—"}[r["beyond_spread"]]] for r in a["rows"]]
        out.append((f"Ablation of {a['base']} (python -m winnow ablation)", [
            "Cumulative rows add one component to the row above (Δ against it); leave-one-out rows drop one from the "
            "full recipe (Δ against it); baselines: Δ = full recipe − baseline. Mean ± std over seeds, equal samples seen.",
            Table(["part", "variant", "subset size", "seeds", "average", a.get("imagenet_group") or "ImageNet", "Δ average",
                   "beyond seed spread"], rows)]))
    if run.timings:
        out.append(("Stage wall time (last run of each stage)", [Table(["stage", "seconds"], [[k, v] for k, v in run.timings.items()])]))
    return out


def build_markdown(run: RunData) -> str:
    title = f"# winnow run report — recipe `{run.funnel.get('recipe', '?')}`\n"
    return title + "".join(f"\n## {t}\n\n" + "\n\n".join(b if isinstance(b, str) else _markdown_table(b) for b in blocks) + "\n"
                           for t, blocks in _sections(run, markdown=True))


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
    if run.ablation.get("rows"):
        rows = [r for r in run.ablation["rows"] if r["average"]]
        if rows:
            figs.append(("ablation", "The ablation: average over seeds (bars: ± std)", plots.ablation(
                [f"{r['part']} ({r['variant']})" for r in rows], [r["average"]["mean"] for r in rows],
                [r["average"]["std"] for r in rows], [r["part"] for r in rows])))
    if run.earlier:
        labels = [f"{r['run']} · {r['recipe']}" for r in run.earlier if r["average"] is not None][:15]
        avgs = [r["average"] for r in run.earlier if r["average"] is not None][:15]
        if avgs:
            figs.append(("earlier_runs", "Average score of this and earlier runs", plots.runs_chart(labels, avgs)))
    return figs


# Autoescaping on (select_autoescape matches the name's ending): every value the page shows is text.
_TEMPLATES = Environment(loader=PackageLoader("winnow", "templates"), autoescape=select_autoescape(["html.j2"]),
                         trim_blocks=True, lstrip_blocks=True)
_TEMPLATES.filters["cell"] = _cell
_FIGURES_OF = {"Funnel": ("funnel", "hist_", "grid_"), "Evaluation": ("eval_",), "Earlier runs": ("earlier_",),
               "Ablation": ("ablation",)}


def _figures_of(title: str) -> tuple[str, ...]:
    """The figure stems a section shows: by the start of its title (the ablation's names its recipe)."""
    return next((stems for start, stems in _FIGURES_OF.items() if title.startswith(start)), ())


def build_html(run: RunData, figs: list[tuple[str, str, bytes]]) -> str:
    sections = [{"title": title, "blocks": blocks,
                 "figures": [(caption, base64.b64encode(png).decode("ascii")) for stem, caption, png in figs
                             if stem.startswith(_figures_of(title))]}
                for title, blocks in _sections(run, markdown=False)]
    return _TEMPLATES.get_template("report.html.j2").render(recipe=run.funnel.get("recipe", "?"), sections=sections)


def dvc_plot_data(run: RunData) -> dict[str, pd.DataFrame]:
    """Tables for ``dvc plots``: the funnel and the per-task scores."""
    out = {}
    if run.funnel:
        out["funnel"] = pd.DataFrame([{"step": "pool", "kept": run.funnel["pool_size"]}] +
                                     [{"step": s["step"], "kept": s["kept_after"]} for s in run.funnel["steps"]])
    if run.summary.get("tasks"):
        out["eval"] = pd.DataFrame([{"task": k, "score": v} for k, v in run.summary["tasks"].items()])
    return out
