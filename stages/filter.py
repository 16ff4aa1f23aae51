"""Stage `filter`: run the recipe named in params; write uids.npy, decisions.parquet and the funnel;
gate: uids.npy sorted and as large as the funnel says, subset size within the recipe's bounds.
Everything after the engine streams too: the truth metrics read decisions.parquet in batches."""
import json

import pandas as pd

from winnow import io as wio
from winnow import track
from winnow.config import Params
from winnow.executor import Executor
from winnow.demo.truth import truth_metrics
from winnow.filters.engine import params_recipe, run
from winnow.io import read_json, write_json
from winnow.jobs import WORK_ROOT
from winnow.pool import uids as U
from winnow.pool.view import Pool
from winnow.stage import main
from winnow.validate import Gate, expect

OUT = "data/filter"


def decision_summary(funnel: dict) -> pd.DataFrame:
    """One row per step: what it was told, what it fitted (thresholds), what it decided and dropped."""
    return pd.DataFrame([{"step": s["step"], "params": json.dumps(s["params"], sort_keys=True),
                          "state": json.dumps(s["state"], sort_keys=True), "kept_after": s["kept_after"],
                          "dropped_here": s["dropped_here"], "dropped_standalone": s["dropped_standalone"]}
                         for s in funnel["steps"]],
                        columns=["step", "params", "state", "kept_after", "dropped_here", "dropped_standalone"])


def body(p: Params) -> dict:
    recipe = params_recipe(p.filter)   # validated before any data is read
    pool = Pool.open("data/pool", embed_uri="data/embed")
    funnel = run(recipe, pool, OUT, executor=Executor.of(p.filter), work_root=WORK_ROOT,
                 decide=p.filter.decide, decisions=p.filter.decisions)   # per-shard verdicts in a keyed work directory: a killed filter resumes
    if pool.truth_path and p.filter.decisions:
        funnel["truth"] = truth_metrics(f"{OUT}/decisions.parquet", pd.read_parquet(wio.source(pool.truth_path)),
                                        recipe.labels())
    if wio.exists("data/embed/meta.json"):   # what the embed stage quarantined never reaches a step as an image
        emb = read_json("data/embed/meta.json")
        funnel["quarantine"] = {k: emb.get(k, 0) for k in ("corrupt_images", "missing_images", "unreadable_tars")}
    seconds = {s["step"]: s.pop("seconds") for s in funnel["steps"]}   # MLflow only: funnel.json is a DVC output
    write_json("reports/filter/funnel.json", funnel)
    track.log_artifact("reports/filter/funnel.json")
    track.log_table(decision_summary(funnel), "filter/decision_summary.json")
    subset = U.load(f"{OUT}/uids.npy")            # sorted u8,u8, or a named UidError
    unique = int(len(subset) and 1 + (subset[1:] != subset[:-1]).sum())
    E = expect()
    gate = Gate("filter")
    # uids.npy agrees with the funnel's per-shard counts; whether every uid is in the pool is the
    # reshard gate's (winnow.reshard.plan reads the pool's uids, which the resharder needs anyway)
    gate.check("subset", pd.DataFrame([{"file": f"{OUT}/uids.npy", "entries": len(subset), "unique": unique,
                                        "subset_size": funnel["subset_size"], "kept": funnel["kept_unique"]}]), [
        E.ExpectColumnPairValuesToBeEqual(column_A="entries", column_B="subset_size"),
        E.ExpectColumnPairValuesToBeEqual(column_A="unique", column_B="kept"),
    ], id_column="file")
    b = recipe.bounds
    gate.check("size", pd.DataFrame([{"recipe": recipe.name, "kept_fraction": funnel["kept_fraction"],
                                      "kept": funnel["kept_unique"]}]), [
        E.ExpectColumnValuesToBeBetween(column="kept_fraction", min_value=b.min_fraction, max_value=b.max_fraction),
        E.ExpectColumnValuesToBeBetween(column="kept", min_value=p.filter.min_kept),
    ], id_column="recipe")
    gate.finish()
    metrics = {"pool_size": funnel["pool_size"], "kept": funnel["kept_unique"], "subset_size": funnel["subset_size"],
               "kept_fraction": funnel["kept_fraction"]}
    for s in funnel["steps"]:
        metrics[f"kept_after.{s['step']}"] = s["kept_after"]
        metrics[f"seconds.{s['step']}"] = seconds[s["step"]]
    for k, v in funnel.get("download", {}).items():   # DataComp's download layout
        metrics[f"download.{k}"] = v
    return metrics


if __name__ == "__main__":
    main("filter", body)
