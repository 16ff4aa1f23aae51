"""Stage `report`: reports/index.html (self-contained) and index.md, figures in reports/plots/,
tables for `dvc plots`, and the run comparison from MLflow."""
from pathlib import Path

import pandas as pd

from winnow import compare, report, track
from winnow.config import Params
from winnow.io import atomic_file
from winnow.stage import main
from winnow.validate import Gate, expect

HTML, MD, PLOTS = "reports/index.html", "reports/index.md", Path("reports/plots")


def body(p: Params) -> dict:
    try:   # tracking history is a nice-to-have here: an unreachable server must not block the report
        earlier = compare.runs_table(track.tracking_uri(p.tracking.uri), p.tracking.experiment)
        compare.write(earlier)
    except Exception as exc:  # noqa: BLE001
        print(f"report: earlier runs unavailable ({track.scrub(str(exc))[:200]})")
        earlier = []
    run = report.collect(earlier=earlier)
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
    wanted = ["Funnel", "Evaluation"]
    gate.check("sections", pd.DataFrame([{"section": s, "present": f"<h2>{s}</h2>" in html} for s in wanted]),
               [expect().ExpectColumnValuesToBeInSet(column="present", value_set=[True])], id_column="section")
    gate.check("figures", pd.DataFrame([{"figure": s, "bytes": len(png)} for s, _, png in figs] or [{"figure": "none", "bytes": 0}]),
               [expect().ExpectColumnValuesToBeBetween(column="bytes", min_value=100)], id_column="figure")
    gate.finish()
    for path in (HTML, MD, "reports/compare/runs.md"):
        track.log_artifact(path)
    print(f"report: {Path(HTML).resolve()}")
    return {"figures": len(figs), "report_bytes": len(html)}


if __name__ == "__main__":
    main("report", body)
