"""What every stage entry point shares: load and validate params, run inside an MLflow child run,
time it, log metrics, and turn known failures into one clear message and a non-zero exit.

A stage's metrics also go to ``reports/stages/<stage>.json`` when dvc.yaml declares it (a DVC
output, wall times left out so its bytes depend only on the inputs): when DVC skips the stage or restores it from its run-cache,
the report stage logs a "cached" child run with the metrics of the outputs DVC restored."""
from __future__ import annotations

import sys
import time
from typing import Callable

from winnow.config import Params, load_params
from winnow.dvcfile import outputs, params_keys
from winnow.errors import WinnowError, report_unexpected
from winnow.io import write_json


def record_path(stage: str) -> str:
    return f"reports/stages/{stage}.json"


def _is_timing(key: str) -> bool:
    return key == "wall_s" or "seconds" in key or "per_s" in key


def main(stage: str, body: Callable[[Params], dict]) -> None:
    """Run ``body(params)`` as stage ``stage``; it returns metrics (nested dicts are flattened).
    The params sections logged to MLflow are the stage's dvc.yaml ``params:``, declared there only."""
    from winnow import track

    t0 = time.time()
    try:
        from winnow.workspace import check_workspace

        check_workspace()     # never between the stages of another run in this workspace
        sections = params_keys(stage)
        params = load_params()
        if params.storage.endpoint_url:
            from winnow import s3

            s3.use_endpoint(params.storage.endpoint_url)
        with track.stage_run(stage, params, sections):
            metrics = body(params) or {}
            if record_path(stage) in outputs(stage):
                write_json(record_path(stage), {k: v for k, v in track.flatten(metrics).items()
                                                if isinstance(v, (int, float)) and not _is_timing(k)})
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
    except Exception:
        print(report_unexpected(f"winnow {stage}"), file=sys.stderr)
        sys.exit(1)
    print(f"winnow {stage}: done in {time.time() - t0:.1f}s", file=sys.stderr)
