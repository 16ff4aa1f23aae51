"""What every stage entry point shares: load and validate params, run inside an MLflow child run,
time it, log metrics, and turn known failures into one clear message and a non-zero exit."""
from __future__ import annotations

import sys
import time
from typing import Callable

from winnow.config import Params, load_params
from winnow.dvcfile import params_keys
from winnow.errors import WinnowError
from winnow.io import write_json

def main(stage: str, body: Callable[[Params], dict]) -> None:
    """Run ``body(params)`` as stage ``stage``; it returns metrics (nested dicts are flattened).
    The params sections logged to MLflow are the stage's dvc.yaml ``params:``, declared there only."""
    from winnow import track

    t0 = time.time()
    try:
        sections = params_keys(stage)
        params = load_params()
        if params.storage.endpoint_url:
            from winnow import s3

            s3.use_endpoint(params.storage.endpoint_url)
        with track.stage_run(stage, params, sections):
            metrics = body(params) or {}
            if params.storage.uri:   # after the gate: only validated outputs are published
                from winnow.publish import publish_stage, storage_prefix

                prefix = storage_prefix(params.storage.uri)   # an experiment publishes under exps/<name>
                published = publish_stage(stage, prefix)
                print(f"winnow {stage}: published {sum(x['files'] for x in published)} files to {track.scrub(prefix)}",
                      file=sys.stderr)
            metrics["wall_s"] = round(time.time() - t0, 2)
            track.log_metrics(metrics)
            write_json(f"reports/timings/{stage}.json", {"stage": stage, "wall_s": metrics["wall_s"]})
    except WinnowError as exc:
        print(f"\nwinnow {stage}: FAILED — {type(exc).__name__}\n{track.scrub(str(exc))}\n", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 1))   # 2: a config error (ParamsError), which no retry fixes
    print(f"winnow {stage}: done in {time.time() - t0:.1f}s", file=sys.stderr)
