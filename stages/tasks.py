"""Stage `tasks`: the evaluation suite's sets.

Demo layout (``configs/tasks/demo.yaml``): write the demo suite (webdataset layout) into
eval.data_root; gate: layout complete and no evaluation image appears in the pool.

DataComp layout (``configs/tasks/datacomp38.yaml``): nothing is generated. The real sets are
checked where DataComp's ``download_evalsets.py`` put them (eval.data_root): every
``wds_<key>_test/`` with its class names, templates, ``test/nshards.txt`` and every tar present and
complete, and Flickr / MSCOCO / WinoGAViL loadable offline from ``hf_cache/``. The result, with
each set's fingerprint, is ``data/tasks/sets.json`` (so DVC re-runs evaluate when a set changes).
A missing set fails the gate naming every one, unless ``eval.allow_partial`` — then they are listed
and the evaluation reports a labelled partial average. The pool-overlap check is the demo's: DataComp
deduplicated its pools against these sets upstream.
"""
import pandas as pd

from winnow.config import Params, ParamsError
from winnow.io import atomic_dir, cache_local, write_json
from winnow.stage import main
from winnow.demo.tasks import generate_task
from winnow.tasks import check_set, fingerprint, load_suite, task_data
from winnow.validate import Gate, GateError, expect

OUT = "data/tasks"


def check_real(p: Params, suite) -> dict:
    from pathlib import Path

    root = Path(cache_local(p.eval.data_root)).resolve()
    out = Path(OUT).resolve()
    if root == out or out in root.parents:
        raise ParamsError(f"eval.data_root {p.eval.data_root} lies inside {OUT}, the tasks stage's DVC output, which "
                          f"DVC removes before the stage runs: keep the downloaded sets outside it")
    rows = []
    for task in suite.tasks:
        r = check_set(task, root, suite.layout)
        r["fingerprint"] = fingerprint(task_data(task, root, suite.layout)) if r["status"] == "present" else None
        rows.append(r)
        print(f"tasks: {task.key:<50} {r['status']}" + (f" — {r['reason']}" if r["reason"] else ""))
    missing = [r for r in rows if r["status"] != "present"]
    with atomic_dir(OUT) as tmp:
        write_json(tmp / "sets.json", {"suite": p.eval.suite, "layout": suite.layout, "data_root": str(root),
                                       "allow_partial": p.eval.allow_partial, "sets": rows})
    E = expect()
    gate = Gate("tasks")
    df = pd.DataFrame([{"task": r["task"], "status": r["status"]} for r in rows])
    rules = [E.ExpectColumnDistinctValuesToContainSet(column="status", value_set=["present"])]   # at least one set
    if not p.eval.allow_partial:
        rules.append(E.ExpectColumnValuesToBeInSet(column="status", value_set=["present"]))
    gate.check("sets", df, rules, id_column="task")
    try:
        gate.finish()
    except GateError as exc:
        listing = "\n".join(f"    {r['task']}: {r['reason']}" for r in missing)
        raise GateError(f"{exc}\n  {len(missing)} of {len(rows)} evaluation sets missing under {root}:\n{listing}\n"
                        f"  Download them with DataComp's download_evalsets.py {root}, or set eval.allow_partial: "
                        f"true to evaluate the sets that are there (a labelled partial average).") from None
    if missing:
        print(f"tasks: {len(missing)} set(s) missing, listed in {OUT}/sets.json (eval.allow_partial): "
              + ", ".join(r["task"] for r in missing))
    return {"tasks": len(rows) - len(missing), "missing": len(missing),
            "bytes": int(sum(r["bytes"] or 0 for r in rows))}


def pool_overlap(pool, hashes: pd.Series) -> set[str]:
    """The evaluation images' hashes that some pool sample has: the (small) set of task hashes is
    held and the pool's sha256 column streamed a shard at a time, never a set of every pool hash."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from winnow.pool import shards

    wanted, found = pa.array(hashes.unique(), pa.string()), set()
    for s in pool.shards:
        sha = shards.read_meta(pool.uri, s, columns=["sha256"])["sha256"]
        found.update(sha.filter(pc.is_in(sha, value_set=wanted)).unique().to_pylist())
    return found


def body(p: Params) -> dict:
    suite = load_suite(p.eval.suite)
    if suite.layout != "demo":
        return check_real(p, suite)
    from winnow.pool.view import Pool

    rows, hashes = [], []
    for task in suite.tasks:
        if task.demo is None:
            continue   # a demo-layout suite may list tasks whose sets are placed by hand
        r = generate_task(task, p.eval.data_root, p.seed, p.eval.test_samples, p.eval.train_samples)
        hashes += [(task.key, h) for h in r["sha256"]]
        rows.append({"task": task.key, "images": len(r["sha256"])})
    img = pd.DataFrame(hashes, columns=["task", "sha256"])
    img["in_pool"] = img["sha256"].isin(pool_overlap(Pool.open("data/pool"), img["sha256"]))
    E = expect()
    gate = Gate("tasks")
    gate.check("task_images", img, [E.ExpectColumnValuesToBeInSet(column="in_pool", value_set=[False])],
               id_column="sha256")
    gate.check("tasks", pd.DataFrame(rows), [E.ExpectColumnValuesToBeBetween(column="images", min_value=1)],
               id_column="task")
    gate.finish()
    return {"tasks": len(rows), "images": len(img)}


if __name__ == "__main__":
    main("tasks", body)
