"""Stage `evaluate`: zero-shot classification, retrieval and association on the suite; results.jsonl
per task (kept by DVC across runs so a killed evaluation resumes; lines belong to one checkpoint),
summary.json (DVC metrics) with each main metric, group means and the average; gate: metrics in
[0, 1] and at least one task scored (missing tasks are listed, never scored zero)."""
import pandas as pd

from winnow import models, track
from winnow.config import Params
from winnow.evaluate import evaluate_suite, summarize, write_summary
from winnow.io import cache_local, file_sha256, read_json
from winnow.stage import main
from winnow.tasks import load_suite
from winnow.validate import Gate, expect

OUT = "reports/eval"


def body(p: Params) -> dict:
    info = read_json("models/clip/info.json")
    model, pre, tok = models.load(info["model"], info["checkpoint"])
    rows = evaluate_suite(model, pre, tok, load_suite(p.eval.suite), str(cache_local(p.eval.data_root)),
                          f"{OUT}/results.jsonl", batch_size=p.eval.batch_size, model_id=file_sha256(info["checkpoint"]))
    summary = summarize(rows) | {"model": info}
    E = expect()
    gate = Gate("evaluate")
    df = pd.DataFrame([{"key": r["key"], "main": r["main"], "status": r["status"]} for r in rows])
    gate.check("results", df[df.status == "ok"] if (df.status == "ok").any() else df, [
        E.ExpectColumnValuesToBeBetween(column="main", min_value=0.0, max_value=1.0),
        E.ExpectColumnValuesToBeInSet(column="status", value_set=["ok"]),
    ], id_column="key")
    gate.finish()
    write_summary(summary, f"{OUT}/summary.json")
    track.log_artifact(f"{OUT}/results.jsonl")
    track.log_table(pd.DataFrame([{"task": r["key"], "group": r["group"], "main_metric": r["main_metric"],
                                   "main": r["main"], "status": r["status"]} for r in rows]), "eval/tasks.json")
    track.log_metrics({f"task.{r['key']}": {k: v for k, v in r["metrics"].items() if k != "groups"}
                       for r in rows if r["status"] == "ok"})
    return {"average": summary["average"], **{f"group.{g}": v for g, v in summary["groups"].items()},
            **{f"main.{k}": v for k, v in summary["tasks"].items()}, "missing": len(summary["missing"])}


if __name__ == "__main__":
    main("evaluate", ["eval"], body)
