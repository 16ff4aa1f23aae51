"""A training run killed with SIGKILL after a checkpoint resumes from it when started again with the
same inputs; leftovers of runs with other inputs are removed, never resumed from."""
import json
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, env_for_subprocess, write_caption_tar

SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
from winnow.train import train_clip
r = train_clip(data={data!r}, model="winnow-tiny", samples_seen=512, batch_size=16, lr=1e-3, warmup=2,
               wd=0.1, beta2=0.98, checkpoints=4, out_dir={out!r}, work_root={work!r})
print("RESULT", json.dumps({{"resumed": r["resumed_from_epochs"], "steps": r["steps"],
                             "last": r["curve"][-1]["samples"]}}))
"""


def _script(tmp_path, out):
    return SCRIPT.format(root=str(ROOT), data=str(tmp_path / "data" / "0.tar"), out=str(out), work=str(tmp_path / "work"))


def _result(stdout: str) -> dict:
    return json.loads(next(x for x in stdout.splitlines() if x.startswith("RESULT "))[7:])


@pytest.mark.slow
def test_killed_training_resumes_from_its_latest_checkpoint(tmp_path):
    write_caption_tar(tmp_path / "data" / "0.tar")
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _script(tmp_path, out)], env=env_for_subprocess(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    from winnow.train import _checkpoint_epoch

    # kill as soon as epoch 1's checkpoint loads: open_clip_train torch.saves to the final name, so
    # the file appears before it is whole (a fixed wait lost that race on a loaded machine)
    deadline = time.time() + 300
    ckpt = None
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "work").glob("train/*/run/checkpoints/epoch_1.pt"))
        if found and _checkpoint_epoch(found[0]) == 1:
            ckpt = found[0]
            break
        time.sleep(0.05)
    assert ckpt is not None, f"no checkpoint before the run ended: {proc.stdout.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoint.pt").exists()

    done_epochs = sorted(e for p in ckpt.parent.glob("epoch_[0-9]*.pt") if (e := _checkpoint_epoch(p)) is not None)
    assert done_epochs and done_epochs[-1] < 4, "the run finished before it was killed; make it longer"

    stray = tmp_path / "work" / "train" / "0123456789abcdef"     # a killed run with other inputs
    (stray / "run" / "checkpoints").mkdir(parents=True)
    again = subprocess.run([sys.executable, "-c", _script(tmp_path, out)], env=env_for_subprocess(),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    r = _result(again.stdout)
    assert r["resumed"] and r["resumed"][-1] == done_epochs[-1]       # started after the last saved epoch
    assert r["last"] > 3 * 128 and r["steps"] >= 4 * 128 // 16 - 2       # the curve covers the whole budget
    assert (out / "checkpoint.pt").exists()
    assert not list((tmp_path / "work" / "train").iterdir())      # its own work dir removed when done, the stray one too
