"""The job module: keys cover content, code and params; markers make a re-run skip finished units;
one resume scheme remains in the library."""
import os
import re
import subprocess
from functools import partial
from pathlib import Path

import pytest

from tests.helpers import ROOT
from winnow import dvcfile, jobs
from winnow.executor import Executor


def _square(out: str, unit: str) -> dict:
    Path(out, f"{unit}.txt").write_text(str(int(unit) ** 2))
    return {"value": int(unit) ** 2}


def test_key_changes_with_content_params_and_code(tmp_path):
    small, big = tmp_path / "small.json", tmp_path / "big.bin"
    small.write_text('{"a": 1}')
    big.write_bytes(b"x" * (jobs.SMALL_FILE + 1))

    def key(**params):
        return jobs.Key("t").params(**params).files(small=small, big=big, missing=tmp_path / "nope").code("winnow.jobs").digest()

    k0 = key(x=1)
    assert key(x=1) == k0                            # deterministic
    assert key(x=2) != k0                            # a parameter
    small.write_text('{"a": 2}')                     # same size, other bytes: small files are hashed
    k1 = key(x=1)
    assert k1 != k0
    os.utime(big, ns=(1, 1))                         # a large file: size + mtime
    assert key(x=1) != k1
    assert jobs.Key("t").code("winnow.jobs").digest() != jobs.Key("t").code("winnow.reshard").digest()


def test_code_identity_covers_the_import_closure():
    from winnow.imports import import_closure

    closure = import_closure("winnow.filters.engine")
    assert "winnow/jobs.py" in closure and "winnow/executor.py" in closure and "winnow/pool/view.py" in closure


def test_directory_identity_ignores_writers_temp_files(tmp_path):
    from winnow.io import temp_name

    (tmp_path / "a.parquet").write_bytes(b"1")
    before = jobs.content_identity(tmp_path)
    (tmp_path / temp_name("b.parquet")).write_bytes(b"partial")
    assert jobs.content_identity(tmp_path) == before
    (tmp_path / "b.parquet").write_bytes(b"2")
    assert jobs.content_identity(tmp_path) != before


@pytest.mark.parametrize("kind,workers", [("serial", 1), ("threads", 2), ("processes", 2)])
def test_run_skips_marked_units_and_keeps_unit_order(tmp_path, kind, workers):
    work = jobs.WorkDir("sq", jobs.Key("sq").params(n=5), tmp_path)
    job = jobs.Job("squares", [str(i) for i in range(5)], partial(_square, str(work.path)))
    work.mark("3", {"value": -1})                    # as if a killed run had finished unit 3
    stats = jobs.run(job, Executor(kind, workers), work, progress=False)
    assert [s["value"] for s in stats] == [0, 1, 4, -1, 16]
    assert not (work.path / "3.txt").exists()        # not redone
    assert work.finished() == {str(i): {"value": v} for i, v in enumerate([0, 1, 4, -1, 16])}


def test_unit_keys_redo_only_the_changed_unit(tmp_path):
    work = jobs.WorkDir("t", "k", tmp_path)
    calls = []
    job = jobs.Job("t", ["a", "b"], lambda u: calls.append(u) or {"u": u}, unit_keys={"a": "1", "b": "1"})
    jobs.run(job, work=work, progress=False)
    job.unit_keys["b"] = "2"
    jobs.run(job, work=work, progress=False)
    assert calls == ["a", "b", "b"]


def test_another_key_starts_clean_and_removes_the_old_work(tmp_path):
    """A finished process's work under another key is a leftover: removed; a live one's is kept."""
    import sys

    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
                    f"from winnow import jobs\njobs.WorkDir('j', 'aaaa', {str(tmp_path)!r}).mark('u', {{}})"], check=True)
    assert (tmp_path / "j" / "aaaa" / "_done" / "u.json").exists()
    b = jobs.WorkDir("j", "bbbb", tmp_path)
    assert b.done("u") is None and not (tmp_path / "j" / "aaaa").exists()
    c = jobs.WorkDir("j", "cccc", tmp_path)        # b's owner (this process) is alive: b stays
    assert b.path.exists() and c.path.exists()
    b.release()
    assert not b.path.exists()


def test_reduce_streams_pairs_in_unit_order():
    job = jobs.Job("r", ["2", "0", "1"], lambda u: int(u), reduce=lambda pairs: [u + ":" + str(s) for u, s in pairs])
    assert jobs.run(job, progress=False) == ["2:2", "0:0", "1:1"]


def test_unit_names_cannot_leave_the_work_directory(tmp_path):
    from winnow.io import UnsafePath

    work = jobs.WorkDir("j", "k", tmp_path)
    with pytest.raises(UnsafePath):
        work.mark("../../escape", {})


def test_one_resume_scheme_remains():
    """The old completion markers and hand-built keys are gone from the library and the stages.
    (The check stage's outputs persist for another reason: it rewrites them all on every run, and a
    check refused beside another run must not delete the files that run's next stages read.)"""
    old = re.compile(r"\.done\.json|_stats\.json\"?\)?\s*#?\s*marker|sha256\(json\.dumps|persist: true|hexdigest\(\)\[:16\]")
    check_outs = {f"- {o}: {{persist: true}}" for o in dvcfile.outputs("check", ROOT / "dvc.yaml")}
    hits = []
    for path in [*ROOT.glob("winnow/**/*.py"), *ROOT.glob("stages/*.py"), ROOT / "dvc.yaml"]:
        if path.name == "jobs.py":      # the one place keys are built
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if old.search(line) and line.strip() not in check_outs:
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)
    out = subprocess.run(["git", "grep", "-n", "keyed_work_dir", "--", "winnow", "stages"], cwd=ROOT,
                         capture_output=True, text=True).stdout.splitlines()
    assert all(x.startswith(("winnow/io.py", "winnow/jobs.py")) for x in out), out
