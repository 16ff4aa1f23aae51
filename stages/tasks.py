"""Stage `tasks`: write the demo evaluation suite (webdataset layout); gate: layout complete and
no evaluation image appears in the pool."""
import pandas as pd

from winnow.config import Params
from winnow.pool import shards
from winnow.pool.view import Pool
from winnow.stage import main
from winnow.tasks import generate_task, load_suite
from winnow.validate import Gate, expect


def body(p: Params) -> dict:
    suite = load_suite(p.eval.suite)
    rows, hashes = [], []
    for task in suite.tasks:
        if task.demo is None:
            continue   # real sets are read from eval.data_root, not generated
        r = generate_task(task, p.eval.data_root, p.seed, p.eval.test_samples, p.eval.train_samples)
        hashes += [(task.key, h) for h in r["sha256"]]
        rows.append({"task": task.key, "images": len(r["sha256"])})
    pool = Pool.open("data/pool")
    pool_sha = set()
    for s in pool.shards:
        pool_sha.update(shards.read_meta(pool.uri, s, columns=["sha256"])["sha256"].to_pylist())
    img = pd.DataFrame(hashes, columns=["task", "sha256"])
    img["in_pool"] = img["sha256"].isin(pool_sha)
    E = expect()
    gate = Gate("tasks")
    gate.check("task_images", img, [E.ExpectColumnValuesToBeInSet(column="in_pool", value_set=[False])],
               id_column="sha256")
    gate.check("tasks", pd.DataFrame(rows), [E.ExpectColumnValuesToBeBetween(column="images", min_value=1)],
               id_column="task")
    gate.finish()
    return {"tasks": len(rows), "images": len(img)}


if __name__ == "__main__":
    main("tasks", ["seed", "eval"], body)
