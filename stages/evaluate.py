"""Stage `evaluate`: zero-shot classification, retrieval, association and DataComp's fairness
evaluation on the suite, streamed (eval.workers decode, eval.device runs the model: bf16 autocast on
CUDA). Each task is a unit of a job keyed by the checkpoint, the code and the task's entry and set
content (winnow.jobs), so a killed or changed evaluation redoes only what changed; results.jsonl
holds the finished tasks;
summary.json (DVC metrics): each main metric, group means, and the average — DataComp's only when
every ranked task is scored, else a labelled partial average (``partial_average``, ``num_scored``).
Gate: metrics in [0, 1]; at least one task scored; every ranked task scored unless
eval.allow_partial (missing tasks are listed, never scored zero); per task, the share of quarantined
(corrupt, decompression-bomb) images at most eval.max_quarantined."""
import pandas as pd

from winnow import models, track
from winnow.config import Params
from winnow.evaluate import evaluate_suite, summarize, write_summary
from winnow.io import cache_local, file_sha256, read_json
from winnow.jobs import WORK_ROOT
from winnow.stage import main
from winnow.tasks import load_suite
from winnow.validate import Gate, expect

OUT = "reports/eval"


def body(p: Params) -> dict:
    info = read_json("models/clip/info.json")
    model, pre, tok = models.load(info["model"], info["checkpoint"])
    rows = evaluate_suite(model, pre, tok, load_suite(p.eval.suite), str(cache_local(p.eval.data_root)),
                          f"{OUT}/results.jsonl", batch_size=p.eval.batch_size, model_id=file_sha256(info["checkpoint"]),
                          workers=p.eval.workers, device=p.eval.device, work_root=WORK_ROOT)
    summary = summarize(rows) | {"model": info}
    E = expect()
    gate = Gate("evaluate")
    df = pd.DataFrame([{"key": r["key"], "main": r["main"], "status": r["status"], "ranked": bool(r["main_metric"]),
                        "quarantine_share": r.get("quarantine_share", 0.0)} for r in rows])
    ok = df[(df.status == "ok") & df.ranked]
    gate.check("results", ok if len(ok) else df, [
        E.ExpectColumnValuesToBeBetween(column="main", min_value=0.0, max_value=1.0),
        E.ExpectColumnValuesToBeInSet(column="status", value_set=["ok"]),
    ], id_column="key")
    gate.check("quarantine", df, [E.ExpectColumnValuesToBeBetween(column="quarantine_share", min_value=0.0,
                                                                  max_value=p.eval.max_quarantined)], id_column="key")
    if not p.eval.allow_partial:
        gate.check("complete", df, [E.ExpectColumnValuesToBeInSet(column="status", value_set=["ok"])], id_column="key")
    gate.finish()
    write_summary(summary, f"{OUT}/summary.json")
    track.log_artifact(f"{OUT}/results.jsonl")
    track.log_table(pd.DataFrame([{"task": r["key"], "group": r["group"], "main_metric": r["main_metric"],
                                   "main": r["main"], "status": r["status"], "quarantined": r.get("quarantined", 0)}
                                  for r in rows]), "eval/tasks.json")
    track.log_metrics({f"task.{r['key']}": {k: v for k, v in r["metrics"].items() if k != "groups"}
                       | {"seconds": r.get("seconds")} for r in rows if r["status"] == "ok"})
    out = {**{f"group.{g}": v for g, v in summary["groups"].items()},
           **{f"main.{k}": v for k, v in summary["tasks"].items()},
           "missing": len(summary["missing"]), "num_scored": summary["num_scored"]}
    if summary["average"] is not None:
        out["average"] = summary["average"]
    elif summary["partial_average"] is not None:
        out["partial_average"] = summary["partial_average"]
    return out


if __name__ == "__main__":
    main("evaluate", body)
