"""``python -m winnow run``: the whole pipeline through ``dvc repro`` under one MLflow parent run.
``python -m winnow check``: validate params.yaml and the recipe without running anything.
``python -m winnow compare``: MLflow runs side by side (reports/compare/runs.md).
``python -m winnow sweep``: recipes x seeds as DVC experiments (reports/compare/demo.md).
``python -m winnow ablation``: the paper's slice and dice of a recipe (reports/compare/ablation.md).
``python -m winnow publish``: every stage's current outputs to storage.uri.
``python -m winnow launch``: the torchrun command of a scale preset for a GPU cluster."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def _check() -> int:
    """The preflight (winnow.preflight): every check that can run before DVC removes an output; a
    problem is a ParamsError, which main() prints and exits 2 on."""
    from winnow import preflight

    preflight.run("params.yaml")
    print("params.yaml OK")
    return 0


def _run(extra: list[str]) -> int:
    """``dvc repro`` under one MLflow parent run, holding the workspace (no Prefect run or sweep
    shares it); exits with the failed stage's own status (2: a config error). A bad param and a
    busy workspace are named errors, which main() prints."""
    from winnow import preflight, track, workspace
    from winnow.dvcfile import stage_exit_code
    from winnow.io import terminate_unwinds

    params = preflight.run("params.yaml")   # a typo fails before any work
    t0 = time.time()
    try:
        with terminate_unwinds(), workspace.workspace_lock(), track.pipeline_run(params) as run:
            env = dict(os.environ)   # with the parent run's id
            env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
            rc, tail = _tee_stderr(["dvc", "repro", *extra], env)
            if rc != 0:
                raise _Failed(stage_exit_code(tail.splitlines(), rc))
    except _Failed as failed:
        code = failed.code if failed.code >= 0 else 128 - failed.code   # killed by signal N: the shell's 128+N
        print(f"\npipeline FAILED (exit {code}); MLflow parent run {run.info.run_id}", file=sys.stderr)
        return code
    print(f"\npipeline finished in {time.time() - t0:.0f}s; MLflow parent run {run.info.run_id}")
    print(f"report: {Path('reports/index.html').resolve()}")
    return 0


def _tee_stderr(cmd: list[str], env: dict) -> tuple[int, str]:
    """Run ``cmd`` with its stderr passed through as it comes (progress bars included); returns its
    exit status and the last 8 KiB of that stderr."""
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    tail = b""
    try:
        while chunk := os.read(proc.stderr.fileno(), 65536):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail = (tail + chunk)[-8192:]
        return proc.wait(), tail.decode("utf-8", "replace")
    finally:   # interrupted (Ctrl-C, SIGTERM): dvc goes too, and the parent run is marked FAILED
        if proc.poll() is None:
            proc.terminate()
            proc.wait()


class _Failed(Exception):
    def __init__(self, code: int):
        self.code = code


def _compare(limit: int) -> int:
    """Print the evaluated runs of this experiment side by side and write reports/compare/runs.md.
    Reads MLflow only."""
    from winnow import compare, track
    from winnow.config import load_params

    p = load_params()
    rows = compare.runs_table(track.tracking_uri(p.tracking.uri), p.tracking.experiment, limit)
    print(compare.write(rows))
    print(f"wrote {Path('reports/compare/runs.md').resolve()}")
    return 0


def _seeds(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None


def main(argv: list[str] | None = None) -> int:
    """The command line; a named error becomes its message and exit status, any other its
    traceback, both with every URL's credentials masked."""
    from winnow.errors import WinnowError, report_unexpected
    from winnow.track import scrub

    try:
        return _main(argv)
    except WinnowError as exc:
        print(scrub(str(exc)), file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    except Exception:
        print(report_unexpected("winnow"), file=sys.stderr)
        return 1


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(prog="winnow")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run", help="run the pipeline (dvc repro) under one MLflow parent run")
    sub.add_parser("check", help="validate params.yaml, the recipe and the suite")
    cmp = sub.add_parser("compare", help="MLflow runs side by side -> reports/compare/runs.md")
    cmp.add_argument("--limit", type=int, default=50)
    lau = sub.add_parser("launch", help="print the torchrun command of a scale preset for N nodes x G GPUs")
    lau.add_argument("--scale", required=True)
    lau.add_argument("--data", default="data/subset/{00000000..00000099}.tar", help="webdataset shards (brace pattern)")
    lau.add_argument("--nodes", type=int, default=1)
    lau.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    lau.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    lau.add_argument("--seed", type=int, default=0)
    lau.add_argument("--logs", default="logs")
    swp = sub.add_parser("sweep", help="recipes x seeds as DVC experiments -> reports/compare/demo.md")
    swp.add_argument("--recipes", default="no_filter,basic,clip_score_top30,devil_in_details")
    swp.add_argument("--seeds", default="0,1,2", type=_seeds, help="comma-separated integers")
    swp.add_argument("--scale", default="tiny")
    swp.add_argument("--table-only", action="store_true", help="rebuild the table from the saved results")
    abl = sub.add_parser("ablation", help="the paper's slice and dice: a recipe's components added and left out, "
                                          "x seeds, beside baselines -> reports/compare/ablation.md")
    abl.add_argument("--spec", default="devil_in_details", help="configs/ablation/<spec>.yaml")
    abl.add_argument("--seeds", default="0,1,2", type=_seeds, help="comma-separated integers")
    abl.add_argument("--scale", default="tiny")
    abl.add_argument("--table-only", action="store_true", help="rebuild the table from the saved results")
    pub = sub.add_parser("publish", help="publish every stage's current outputs to storage.uri (stages DVC skipped too)")
    pub.add_argument("--uri", default=None, help="s3://bucket/prefix (default: storage.uri)")
    args, extra = ap.parse_known_args(argv)
    if args.cmd == "publish":
        from winnow.config import load_params
        from winnow.dvcfile import stages
        from winnow.publish import publish_stage

        params = load_params()
        uri = args.uri or params.storage.uri
        if params.storage.endpoint_url:
            from winnow import s3

            s3.use_endpoint(params.storage.endpoint_url)
        if not uri:
            print("no storage.uri in params.yaml and no --uri", file=sys.stderr)
            return 2
        for stage in stages():
            for r in publish_stage(stage, uri):
                print(f"{stage}: {r['uri']} ({r['files']} files)")
        return 0
    if args.cmd == "sweep":
        from winnow import sweep

        if args.table_only:
            print(sweep.write_table(sweep.saved_rows(args.recipes.split(","), args.scale)))
            return 0
        return sweep.main(args.recipes.split(","), args.seeds, args.scale)
    if args.cmd == "ablation":
        from winnow import ablation

        return ablation.main(args.spec, args.seeds, args.scale, args.table_only)
    if args.cmd == "compare":
        return _compare(args.limit)
    if args.cmd == "launch":
        from winnow.launch import launch_command

        print(launch_command(args.scale, args.data, nodes=args.nodes, gpus_per_node=args.gpus, accum=args.accum,
                             logs=args.logs, seed=args.seed))
        return 0
    return _run(extra) if args.cmd == "run" else _check()


if __name__ == "__main__":
    sys.exit(main())
