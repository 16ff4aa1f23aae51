"""Stage `report`: reports/index.html (self-contained) and index.md, figures in reports/plots/,
tables for `dvc plots`, the headline metrics (reports/metrics.json, DVC's metrics), and the run
comparison from MLflow. It runs on every `dvc repro` (always_changed), so what it reads from
MLflow is current, and it finishes the execution's MLflow parent run: a child for every stage DVC
skipped or restored (marked cached), the headline metrics, and the report as an artifact."""
import datetime
import os
from pathlib import Path

import pandas as pd

from winnow import compare, report, track
from winnow.config import Params
from winnow.dvcfile import params_keys, stages
from winnow.filters.engine import params_recipe
from winnow.io import atomic_file, read_json, write_json
from winnow.stage import main, record_path
from winnow.validate import Gate, expect

HTML, MD, PLOTS, METRICS = "reports/index.html", "reports/index.md", Path("reports/plots"), "reports/metrics.json"


def headline(funnel: dict, summary: dict) -> dict:
    """What a sweep compares: the average (or the labelled partial one), group means, subset size,
    samples seen and kept fraction."""
    out = {"average": summary.get("average"), "group": summary.get("groups", {}),
           "subset_size": funnel.get("subset_size"), "kept_fraction": funnel.get("kept_fraction"),
           "samples_seen": (summary.get("model") or {}).get("samples_seen")}
    if summary.get("average") is None and summary.get("partial_average") is not None:
        out |= {"partial_average": summary["partial_average"], "num_scored": summary.get("num_scored")}
    return {k: v for k, v in out.items() if v is not None}


def _model_id(results: str = "reports/eval/results.jsonl") -> str | None:
    """The evaluated checkpoint's sha256, as the evaluate stage recorded it."""
    import json

    for line in Path(results).read_text(encoding="utf-8").splitlines() if Path(results).exists() else []:
        return json.loads(line).get("model_id")
    return None


def body(p: Params) -> dict:
    import mlflow

    funnel, summary = read_json("reports/filter/funnel.json"), read_json("reports/eval/summary.json")
    top = headline(funnel, summary)
    write_json(METRICS, top)
    parent = mlflow.get_run(mlflow.active_run().info.run_id).data.tags.get("mlflow.parentRunId")
    others = {s: params_keys(s) for s in stages() if s != "report"}
    cached = track.log_cached_stages(parent, p, others, lambda s: read_json(record_path(s))
                                     if Path(record_path(s)).exists() else {})
    track.finish_parent(parent, top, {"winnow.model": _model_id() or "", "winnow.cached_stages": ",".join(cached)}, [])
    try:   # earlier runs: a store that cannot be searched leaves the section out, not the report
        rows = compare.runs_table(track.tracking_uri(p.tracking.uri), p.tracking.experiment, current=parent)
        compare.write(rows)
    except Exception as exc:  # noqa: BLE001
        print(f"report: earlier runs unavailable ({track.scrub(str(exc))[:200]})")
        rows = []
    me = parent[:8]
    run = report.collect(earlier=[r for r in rows if r["run_id"] != me])
    run.provenance = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "recipe": funnel.get("recipe"), "git commit": track.git_commit(),
        "DVC experiment": os.environ.get("DVC_EXP_NAME"), "MLflow run": parent,
        "scale": p.train.scale, "samples seen": top.get("samples_seen"),
        "pool source": f"{p.pool.source}: {track.scrub(p.pool.uri)}",
        "stages from cache": ", ".join(cached) or "none"}
    run.description = " ".join(params_recipe(p.filter).description.split())
    if funnel.get("recipe") != "no_filter":
        run.baseline = compare.baseline(rows, p.train.scale, exclude=me, comparable=track.comparable(p))
    figs = report.figures(run, "data/pool")
    PLOTS.mkdir(parents=True, exist_ok=True)
    for old in PLOTS.glob("*.png"):     # an earlier recipe's figures (its steps' grids) are not this run's
        if old.stem not in {stem for stem, _, _ in figs}:
            old.unlink()
    for stem, _, png in figs:
        with atomic_file(PLOTS / f"{stem}.png") as tmp:
            Path(tmp).write_bytes(png)
    for name, df in report.dvc_plot_data(run).items():
        with atomic_file(PLOTS / f"{name}.csv") as tmp:
            df.to_csv(tmp, index=False)
    html, md = report.build_html(run, figs), report.build_markdown(run)
    for path, text in ((HTML, html), (MD, md)):
        with atomic_file(path) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
    gate = Gate("report")
    wanted = ["Run", "Funnel", "Evaluation"]
    gate.check("sections", pd.DataFrame([{"section": s, "present": f"<h2>{s}</h2>" in html} for s in wanted]),
               [expect().ExpectColumnValuesToBeInSet(column="present", value_set=[True])], id_column="section")
    gate.check("figures", pd.DataFrame([{"figure": s, "bytes": len(png)} for s, _, png in figs] or [{"figure": "none", "bytes": 0}]),
               [expect().ExpectColumnValuesToBeBetween(column="bytes", min_value=100)], id_column="figure")
    gate.finish()
    track.finish_parent(parent, {}, {}, [HTML, MD])
    for path in (HTML, MD, "reports/compare/runs.md"):
        track.log_artifact(path)
    print(f"report: {Path(HTML).resolve()}")
    return {"figures": len(figs), "report_bytes": len(html), "cached_stages": len(cached)}


if __name__ == "__main__":
    main("report", body)
