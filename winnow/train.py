"""CLIP training through open_clip_train, run in-process (its CLI cannot see our model configs).

Used twice: the ``scorer`` stage trains the filtering network on trusted pairs; the ``train`` stage
trains the evaluated model on the filtered subset. Samples seen is the budget: open_clip_train's
"epochs" are checkpoints of ``samples_seen / checkpoints`` samples each, drawn with resampling.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch

from winnow.models import register_configs

_LOSS = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+).*?([\d.]+)/s, .*?LR: ([\d.eE+-]+) .*?"
                   r"Contrastive_loss: ([\d.eE+-]+|nan|inf)")


class TrainError(RuntimeError):
    pass


def train_clip(*, data: str, model: str, samples_seen: int, batch_size: int, lr: float, warmup: int,
               wd: float, beta2: float, checkpoints: int, out_dir: str | Path, seed: int = 0,
               workers: int = 0) -> dict:
    """Train and write ``out_dir/checkpoint.pt`` (state_dict only). Returns the loss curve."""
    from open_clip_train.main import main as open_clip_train_main

    register_configs()
    out = Path(out_dir)
    logs = out / "logs"
    per_epoch = max(batch_size, samples_seen // checkpoints)
    gpu = torch.cuda.is_available()
    args = [
        "--train-data", data, "--dataset-type", "webdataset", "--dataset-resampled",
        "--train-num-samples", str(per_epoch), "--epochs", str(checkpoints),
        "--batch-size", str(batch_size), "--lr", str(lr), "--warmup", str(warmup), "--wd", str(wd),
        "--beta2", str(beta2), "--model", model, "--seed", str(seed), "--workers", str(workers),
        "--precision", "amp_bf16" if gpu else "fp32", "--logs", str(logs), "--name", "run",
        "--save-frequency", "1", "--save-most-recent", "--resume", "latest",
        "--log-every-n-steps", "1", "--report-to", "",
    ]
    root = logging.getLogger()
    handlers = list(root.handlers)
    levels = {n: lg.level for n, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    levels[""] = root.level
    try:
        rc = open_clip_train_main(args)
    finally:   # open_clip_train adds root handlers and sets every logger to INFO on each call
        for h in root.handlers[len(handlers):]:
            root.removeHandler(h)
            h.close()
        for name, lg in logging.root.manager.loggerDict.items():
            if isinstance(lg, logging.Logger):
                lg.setLevel(levels.get(name, logging.NOTSET))
        root.setLevel(levels[""])
    if rc not in (None, 0):
        raise TrainError(f"open_clip_train exited with {rc}; see {logs / 'run' / 'out.log'}")
    ckpt = logs / "run" / "checkpoints" / "epoch_latest.pt"
    if not ckpt.exists():
        raise TrainError(f"open_clip_train wrote no checkpoint under {ckpt.parent}")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    sd = {k.removeprefix("module."): v for k, v in state["state_dict"].items()}
    torch.save({"state_dict": sd, "model": model, "epoch": state.get("epoch")}, out / "checkpoint.pt")
    curve = parse_log(logs / "run" / "out.log", per_epoch)
    return {"checkpoint": str(out / "checkpoint.pt"), "curve": curve, "steps": len(curve),
            "samples_per_epoch": per_epoch}


def parse_log(path: Path, per_epoch: int) -> list[dict]:
    """Per-step records (samples seen, loss, lr, samples/s) from open_clip_train's text log."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        m = _LOSS.search(line)
        if m:
            ep, n, _, sps, lr, loss = m.groups()
            rows.append({"samples": int(ep) * per_epoch + int(n), "loss": float(loss), "lr": float(lr),
                         "samples_per_s": float(sps)})
    return rows


def loss_is_healthy(curve: list[dict]) -> tuple[bool, str]:
    if not curve:
        return False, "no training steps were logged"
    losses = [r["loss"] for r in curve]
    if not all(math.isfinite(x) for x in losses):
        return False, f"non-finite loss at step {next(i for i, x in enumerate(losses) if not math.isfinite(x))}"
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    if last >= first:
        return False, f"loss did not decrease (first {k} steps {first:.4f}, last {k} steps {last:.4f})"
    return True, f"loss {first:.4f} -> {last:.4f}"
