"""The torchrun command generated from a scale preset: DataComp's per-GPU batch arithmetic, accepted
by open_clip_train's own argument parser. (A real 2-process launch needs GPUs: open_clip_train wraps
the model in DDP with device_ids, which torch refuses for CPU modules.)"""
import shlex

import pytest

from winnow.launch import launch_command


def _args(cmd: str) -> list[str]:
    parts = shlex.split(cmd)
    return parts[parts.index("winnow.train") + 1:]


def test_per_gpu_batch_and_open_clip_accepts_the_arguments():
    from open_clip_train.params import parse_args

    cmd = launch_command("xlarge", "shards/{00000000..00000099}.tar", nodes=4, gpus_per_node=8, accum=2)
    assert cmd.startswith("torchrun --nproc_per_node=8 --nnodes=4 --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:29500")
    a = parse_args(_args(cmd))
    assert a.batch_size == 90112 // (32 * 2) and a.accum_freq == 2
    assert a.model == "ViT-L-14" and a.beta2 == 0.95 and a.warmup == 10000
    assert a.train_num_samples * a.epochs == 12_800_000_000          # the samples-seen budget
    assert a.dataset_resampled and a.resume == "latest" and a.grad_checkpointing
    small = parse_args(_args(launch_command("small", "x.tar", gpus_per_node=8)))
    assert small.batch_size == 512 and small.train_num_samples * small.epochs == 12_800_000
    with pytest.raises(ValueError, match="not divisible"):
        launch_command("small", "x.tar", gpus_per_node=3)
