"""Serve the pipeline as a Prefect deployment with a cron schedule (nightly by default).

    prefect server start --host 127.0.0.1            # terminal 1: API + UI on http://127.0.0.1:4200
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve     # terminal 2
    PREFECT_API_URL=http://127.0.0.1:4200/api prefect deployment run 'winnow-pipeline/winnow-demo' \\
        -p recipe=basic                               # trigger a run now, with parameters

The served process runs flows in this directory (the DVC repo), one at a time: the runner's
``limit=1`` and the deployment's concurrency limit 1 (collision strategy ENQUEUE: a run triggered
while one is running waits for it). ``prefect.yaml`` declares the same deployment, with the same
limit, for ``prefect deploy`` onto a work pool.
"""
from __future__ import annotations

import argparse

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from flows.pipeline import pipeline


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="flows.serve")
    ap.add_argument("--name", default="winnow-demo")
    ap.add_argument("--cron", default="0 3 * * *", help="schedule (default nightly at 03:00)")
    ap.add_argument("--recipe", default=None, help="default filter.recipe of scheduled runs")
    ap.add_argument("--scale", default=None, help="default train.scale of scheduled runs")
    args = ap.parse_args(argv)
    # one flow run at a time: the runs share this workspace (params.yaml, the outputs, DVC's lock)
    one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
    pipeline.serve(name=args.name, cron=args.cron, parameters={"recipe": args.recipe, "scale": args.scale},
                   description="winnow: the dvc.yaml pipeline as a Prefect deployment", tags=["winnow"],
                   limit=1, global_limit=one_at_a_time)


if __name__ == "__main__":
    main()
