"""Quiet by default: what a stage prints is what a person needs. Training shows one line per epoch
(open_clip_train's arguments and per-step lines go only to its log, which still holds every step for
the curve and goes to MLflow), and expected library messages (no pretrained weights when training
from scratch, a CUDA fallback on CPU, GX's temporary directory) never reach the console."""
import json
import subprocess
import sys

from tests.helpers import ROOT, env_for_subprocess, write_caption_tar

NOISE = ("No pretrained weights loaded", "falling back to CPU", "ephemeral docs site", "Params:")

TRAIN = """
import json, sys
sys.path.insert(0, {root!r})
import mlflow
mlflow.set_tracking_uri({uri!r})
from winnow.train import train_clip
with mlflow.start_run() as run:
    r = train_clip(data={data!r}, model="winnow-tiny", samples_seen=256, batch_size=16, lr=1e-3, warmup=2,
                   wd=0.1, beta2=0.98, checkpoints=2, out_dir={out!r}, work_root={work!r})
log = mlflow.artifacts.load_text(run.info.artifact_uri + "/train.log")
print("RESULT", json.dumps({{"steps": r["steps"], "curve": r["curve"], "log_steps": log.count("Train Epoch:")}}))
"""


def test_training_prints_one_line_per_epoch(tmp_path):
    write_caption_tar(tmp_path / "data" / "0.tar")
    (tmp_path / "out").mkdir()
    script = TRAIN.format(root=str(ROOT), uri=f"sqlite:///{tmp_path}/mlflow.db", data=str(tmp_path / "data" / "0.tar"),
                          out=str(tmp_path / "out"), work=str(tmp_path / "work"))
    proc = subprocess.run([sys.executable, "-c", script], env=env_for_subprocess(), capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    console = [x for x in (proc.stdout + proc.stderr).splitlines()
               if x.strip() and not x.startswith("RESULT ") and " mlflow." not in x]   # MLflow's own db setup
    epochs = [x for x in console if "Train Epoch:" in x]
    assert len(epochs) == 2 and all("(100%)]" in x for x in epochs), console
    assert len(console) <= 3 * 2, console
    assert not [x for x in console if x.startswith(NOISE) or any(n in x for n in NOISE)], console
    # the log, which the console no longer shows, still has every step: the curve and MLflow's copy
    assert r["steps"] == 256 // 16 and [x["samples"] for x in r["curve"]] == [16 * (i + 1) for i in range(16)]
    assert r["log_steps"] == 16


GATE = """
import logging, sys
sys.path.insert(0, {root!r})
logging.basicConfig()     # a root handler, as open_clip's first module-level logging.info() installs
import pandas as pd
from winnow.validate import Gate, expect
gate = Gate("quiet", report_dir={reports!r})
gate.check("frame", pd.DataFrame({{"x": [1, 2]}}), [expect().ExpectColumnValuesToBeBetween(column="x", min_value=0)], id_column=None)
gate.finish()
print("OK")
"""


def test_a_gate_prints_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "-c", GATE.format(root=str(ROOT), reports=str(tmp_path))],
                          env=env_for_subprocess(), capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "OK" and not proc.stderr.strip(), proc.stderr
