"""The multi-GPU / multi-node training command of a scale preset (``python -m winnow launch``).

The same preset (configs/scales.yaml) that the ``train`` stage runs in-process becomes a ``torchrun``
command for a cluster: one process per GPU, per-GPU batch = global batch / (world size x
gradient accumulation), so the global batch and the samples-seen budget stay DataComp's. The entry
point is ``winnow.train`` (our model configs registered, then open_clip_train), and ``--resume
latest`` makes a re-submitted job continue from its latest checkpoint.
"""
from __future__ import annotations

import shlex

from winnow.config import load_scale
from winnow.train import open_clip_args


def launch_command(scale: str, data: str, *, nodes: int = 1, gpus_per_node: int = 8, accum: int = 1,
                   logs: str = "logs", name: str | None = None, workers: int = 6, seed: int = 0,
                   rdzv_endpoint: str = "$MASTER_ADDR:29500", precision: str = "amp_bf16") -> str:
    preset = load_scale(scale)
    world = nodes * gpus_per_node
    args = open_clip_args(data=data, model=preset["model"], samples_seen=preset["samples_seen"],
                          global_batch=preset["batch_size"], lr=preset["lr"], warmup=preset["warmup"],
                          wd=preset["wd"], beta2=preset["beta2"], checkpoints=preset["checkpoints"], seed=seed,
                          workers=workers, precision=precision, world_size=world, accum=accum)
    args += ["--logs", logs, "--name", name or f"{scale}-seed{seed}", "--grad-checkpointing",
             "--local-loss", "--gather-with-grad"]
    head = ["torchrun", f"--nproc_per_node={gpus_per_node}", f"--nnodes={nodes}"]
    if nodes > 1:   # every node runs the same command; rendezvous at the first node
        head += ["--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}", "--rdzv_id=winnow"]
    # "--": torchrun would otherwise read --logs as an abbreviation of its own --logs-specs
    cmd = " ".join(shlex.quote(x) for x in head + ["-m", "--", "winnow.train"] + args)
    # keep $MASTER_ADDR expandable by the shell that runs it
    return cmd.replace(shlex.quote(f"--rdzv_endpoint={rdzv_endpoint}"), f"--rdzv_endpoint={rdzv_endpoint}")
