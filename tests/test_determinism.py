"""A reproducible baseline: the same params give the same bytes, whatever the machine's BLAS kernel
and thread count. The demo pool sums its scores and norms exactly (``winnow.demo.pool.exact_dot``),
not through BLAS, whose summation order depends on the CPU's SIMD width and the threads; training
fixes its sample shuffle's seed and its CPU thread count (``winnow.train``), and torch's CPU kernels
run one instruction set on every x86 machine (``winnow.kernels``). The session's built project
and a fresh one run on one thread (and, on x86, another OpenBLAS kernel) must produce the same
outputs for every stage up to the resharded subset, so ``dvc repro`` on a clean clone leaves dvc.lock
as committed (wall times go to MLflow only, never into an output)."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import MICRO_PARAMS, ROOT, env_for_subprocess, make_project

STAGES = ["check", "pool", "tasks", "plan", "scorer", "embed", "filter", "reshard"]
# (thread count, OpenBLAS kernel): the kernel is a stand-in for another CPU (ignored off x86)
MACHINES = [("1", "Haswell"), ("2", "Prescott")]

POOL_SCRIPT = """
import hashlib, json, sys
sys.path.insert(0, {root!r})
from winnow.config import PoolParams
from winnow.demo import pool as demo
from pathlib import Path
demo.write_pool(PoolParams(**{pool!r}), 0, {out!r})
print(json.dumps({{str(p.relative_to({out!r})): hashlib.md5(p.read_bytes()).hexdigest()
                  for p in sorted(Path({out!r}).rglob("*")) if p.is_file()}}))
"""


def _machine_env(threads: str, kernel: str) -> dict:
    env = env_for_subprocess()
    env.update(OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
               OPENBLAS_CORETYPE=kernel)
    return env


def test_exact_dot_is_independent_of_summation_order():
    """What makes the pool's scores machine-independent: the sum is exact, so no order of adding the
    products (a SIMD width, a split across threads) can change its bits."""
    from winnow.demo.pool import exact_dot, unit_rows

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(768), rng.standard_normal(768)
    want = exact_dot(a, b)
    for _ in range(20):
        p = rng.permutation(768)
        assert exact_dot(a[p], b[p]) == want
    assert want == pytest.approx(float(a @ b), rel=1e-12)
    h = a.astype(np.float16)
    assert exact_dot(h, h) == pytest.approx(float(h.astype(np.float64) @ h.astype(np.float64)), rel=1e-12)
    u = unit_rows(np.stack([a, b]))
    assert [exact_dot(r, r) for r in u] == pytest.approx([1.0, 1.0], abs=1e-15)
    assert np.array_equal(unit_rows(a), u[0])


def test_demo_pool_bytes_do_not_depend_on_blas(tmp_path):
    """The demo pool, generated under two thread counts and OpenBLAS kernels, has identical files
    (before exact sums, another kernel changed the parquet's scores: 66,388,563 vs 66,388,559 bytes)."""
    pool = {**MICRO_PARAMS["pool"], "num_samples": 600, "trusted_samples": 64}
    hashes = []
    for i, (threads, kernel) in enumerate(MACHINES):
        out = str(tmp_path / f"pool{i}")
        proc = subprocess.run([sys.executable, "-c", POOL_SCRIPT.format(root=str(ROOT), pool=pool, out=out)],
                              env=_machine_env(threads, kernel), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        hashes.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert len(hashes[0]) > 10 and hashes[0] == hashes[1]


KERNELS = """
import os, winnow, torch
torch.ones(8) @ torch.ones(8)   # the first op: ATen reads its capability here
print(torch.backends.cpu.get_cpu_capability(), os.environ.get("MKL_CBWR"), os.environ.get("ONEDNN_MAX_CPU_ISA"))
"""


def test_torch_runs_one_instruction_set_on_every_x86_machine():
    """Each of ATen's kernels, MKL's BLAS and oneDNN picks the machine's best instruction set, and
    each alone changed the demo scorer's checkpoint (AVX-512 vs AVX2, measured): importing winnow
    pins all three to AVX2, so an AVX-512 and an AVX2 machine write the same bytes. A user's own
    choice is kept."""
    from winnow.kernels import PINNED, _has_avx2

    if not _has_avx2():
        pytest.skip("not x86 with AVX2 + FMA: torch keeps this machine's own kernels")
    env = {k: v for k, v in env_for_subprocess().items() if k not in PINNED}
    got = subprocess.run([sys.executable, "-c", KERNELS], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.split() == ["AVX2", "AVX2", "AVX2"]
    own = subprocess.run([sys.executable, "-c", KERNELS], env=env | {"ATEN_CPU_CAPABILITY": "default"},
                         capture_output=True, text=True, check=True)
    assert own.stdout.split() == ["DEFAULT", "AVX2", "AVX2"]


def _outs(project: Path) -> dict:
    """Every output of STAGES by its dvc.lock hash."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert set(STAGES) <= set(lock)
    return {o["path"]: o["md5"] for stage in STAGES for o in lock[stage]["outs"]}


@pytest.mark.slow   # the pipeline to the subset once more, scorer training included (~80 s on 2 cores)
def test_stages_to_the_subset_give_the_same_bytes_on_other_threads_and_kernels(built, tmp_path):
    """The session's built project (this machine's threads and BLAS kernel) against a fresh copy of
    its params run on one thread and another OpenBLAS kernel, with a DVC cache of its own (nothing
    restored from the run-cache)."""
    project = make_project(tmp_path / "other", MICRO_PARAMS)
    proc = subprocess.run(["dvc", "repro", "reshard"], cwd=project, env=_machine_env("1", "Prescott"),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = _outs(built), _outs(project)
    assert "models/scorer" in a and "data/subset" in a
    assert {k for k in a if a[k] != b.get(k)} == set()
    checkpoint = [hashlib.md5((p / "models/scorer/checkpoint.pt").read_bytes()).hexdigest() for p in (built, project)]
    assert checkpoint[0] == checkpoint[1]
