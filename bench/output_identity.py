"""Are a code tree's demo outputs byte-identical to another's? (a refactor's check, issue #14)

    # 1. build a project with tree A (pool, tasks, plan, scorer, embed, then every recipe)
    python bench/output_identity.py run --code A --project /tmp/a --out /tmp/a.json
    # 2. re-run tree B on A's pool, tasks and scorer (the scorer's training is not byte-reproducible
    #    across runs, so B embeds with A's scorer): embed, then every recipe
    python bench/output_identity.py run --code B --project /tmp/b --reuse /tmp/a --out /tmp/b.json
    # 3. compare
    python bench/output_identity.py compare /tmp/a.json /tmp/b.json

Every recipe in configs/recipes runs through the filter and reshard stages serially and on two
processes; the sha256 of every file under data/embed, data/filter and data/subset is recorded
(meta.json files, which hold timings, are left out). Each stage is the tree's own ``python -m
stages.<name>`` in a copy of its tracked files.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

SMALL = {"num_samples": 1200, "shard_size": 200, "trusted_samples": 400, "image_size": 64}


def _copy_tree(code: Path, project: Path) -> None:
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    for f in subprocess.run(["git", "ls-files"], cwd=code, capture_output=True, text=True, check=True).stdout.split():
        if (code / f).exists() and not f.startswith("tests/"):
            (project / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(code / f, project / f)


def _table_digest(path: Path) -> str:
    """A parquet file's content, whatever its layout (row groups, compression, statistics): the
    sha256 of its table as one Arrow IPC stream."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path).combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def _hashes(project: Path, rel: str) -> dict:
    """sha256 of every file's bytes, and of every parquet file's table (``<path>#table``)."""
    d = project / rel
    files = [p for p in sorted(d.rglob("*")) if p.is_file() and p.name != "meta.json"] if d.exists() else []
    out = {str(p.relative_to(project)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    return out | {f"{p.relative_to(project)}#table": _table_digest(p) for p in files if p.suffix == ".parquet"}


def run(code: Path, project: Path, out: Path, reuse: Path | None) -> None:
    _copy_tree(code, project)
    if reuse:
        for d in ("data/pool", "data/tasks", "data/plan", "models/scorer"):
            shutil.copytree(reuse / d, project / d)
        params = yaml.safe_load((reuse / "params.yaml").read_text())
    else:
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["pool"].update(SMALL)
        params["eval"].update(test_samples=96, train_samples=32)
        params["scorer"]["train"].update(epochs=3)
        params["scorer"]["min_auc"] = 0.5
        params["filter"].update(min_kept=1)
        params["tracking"] = {"uri": "sqlite:///mlflow.db", "experiment": "output-identity"}
    env = dict(os.environ, PYTHONPATH=str(project), HF_HUB_OFFLINE="1", GX_ANALYTICS_ENABLED="false",
               PREFECT_LOGGING_LEVEL="WARNING")

    def stage(name: str, **filter_params) -> tuple[int, str]:
        params["filter"].update(filter_params)
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        r = subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=project, env=env, capture_output=True, text=True)
        return r.returncode, (r.stderr.strip().splitlines() or [""])[-1]

    # the recipe that needs every encoding, so the embed stage computes all of them
    for name in ([] if reuse else ["pool", "tasks", "plan", "scorer"]) + ["embed"]:
        rc, err = stage(name, recipe="devil_in_details", executor="serial", workers=1)
        if rc:
            raise SystemExit(f"stage {name} failed: {err}")
    result = {"embed": _hashes(project, "data/embed")}
    for recipe in sorted(p.stem for p in (project / "configs" / "recipes").glob("*.yaml")):
        for executor, workers in (("serial", 1), ("processes", 2)):
            rc, err = stage("filter", recipe=recipe, executor=executor, workers=workers)
            if rc:
                result[f"{recipe}/{executor}"] = {"error": err}
                continue
            rc, err = stage("reshard")
            result[f"{recipe}/{executor}"] = _hashes(project, "data/filter") | (
                _hashes(project, "data/subset") if rc == 0 else {"reshard_error": err})
    out.write_text(json.dumps(result, indent=1))
    print(f"{len(result)} output sets -> {out}")


def compare(a: Path, b: Path) -> int:
    """0 when every output set is identical; files only ``a`` has are listed (removed outputs)."""
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    bad = 0
    for key in ra:
        x, y = ra[key], rb.get(key, {})
        if "error" in x or "error" in y:
            print(f"{key}: {'both fail' if 'error' in x and 'error' in y else 'ONE FAILS'}: {x.get('error') or y.get('error')}")
            bad += not ("error" in x and "error" in y)
            continue
        only_a = sorted(f for f in set(x) - set(y) if not f.endswith("#table"))   # an older record has no #table
        differ = sorted(f for f in set(x) & set(y) if x[f] != y[f]) + sorted(set(y) - set(x) - {f + "#table" for f in x})
        # a parquet file whose bytes differ but whose table is the same only changed layout
        layout = [f for f in differ if f"{f}#table" in x and f"{f}#table" in y and x[f"{f}#table"] == y[f"{f}#table"]]
        differ = [f for f in differ if f not in layout and not (f.endswith("#table") and f[:-6] in layout)]
        verdict = "DIFFERS " + str(differ[:5]) if differ else "identical" + (
            f" (same tables, parquet layout differs: {', '.join(layout)})" if layout else "")
        print(f"{key}: {verdict} ({len([f for f in set(x) & set(y) if not f.endswith('#table')])} files)"
              + (f"; only in {a.name}: {len(only_a)} ({only_a[0]} …)" if only_a else ""))
        bad += bool(differ)
    return 1 if bad else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--code", type=Path, required=True)
    r.add_argument("--project", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--reuse", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = ap.parse_args()
    if args.cmd == "run":
        run(args.code.resolve(), args.project.resolve(), args.out, args.reuse.resolve() if args.reuse else None)
    else:
        sys.exit(compare(args.a, args.b))


if __name__ == "__main__":
    main()
