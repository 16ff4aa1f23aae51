"""The tests' fixtures. Helpers that are not fixtures live in tests/helpers.py; a test module
imports them one way, ``from tests.helpers import ...``, and never imports this file."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("WINNOW_PARENT_RUN_ID", None)
if worker := os.environ.get("PYTEST_XDIST_WORKER"):     # each worker its own Prefect database (sqlite)
    import tempfile

    os.environ["PREFECT_HOME"] = os.path.join(tempfile.gettempdir(), f"winnow-tests-prefect-{worker}")

# `python -m pytest` (make test) has the repository root on sys.path; a bare `pytest` has only tests/
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.fixtures.datacomp_pool import datacomp_pool  # noqa: E402,F401  (session fixture, for every module)
from tests.helpers import MICRO_PARAMS, POINTS, copy_project, dvc, git, make_project, winnow  # noqa: E402


# The tests that read the session's built project, copy it or sweep it: one xdist group, so that
# `make test` (pytest-xdist, --dist loadgroup) builds it once, and first, as it is the longest.
BUILT = {"built", "project", "swept", "swept_project"}


@pytest.hookimpl(tryfirst=True)     # before xdist's own hook, which reads the group marks
def pytest_collection_modifyitems(config, items):
    """An xdist group for every test: ``built`` for those that use the built project, else its
    module (a module's own fixtures are built once). Under xdist the built group is dispatched first."""
    def uses_built(item):        # conftest's built project, not a module's own fixture of that name
        return BUILT & set(item.fixturenames) and not hasattr(item.module, "built")

    for item in items:
        item.add_marker(pytest.mark.xdist_group("built" if uses_built(item) else item.module.__name__))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: not uses_built(item))


@pytest.fixture(scope="session")
def demo_pool(tmp_path_factory):
    """A small demo pool (600 samples, 3 shards), generated once per session."""
    from winnow.config import PoolParams
    from winnow.demo import pool as demo

    out = tmp_path_factory.mktemp("pool") / "pool"
    cfg = PoolParams(**{k: v for k, v in MICRO_PARAMS["pool"].items()})
    demo.write_pool(cfg, 0, str(out))
    return out


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One real S3 server (SeaweedFS) per test session; its endpoint and credentials are in the
    environment while it runs (boto3's standard chain reads them, as in production)."""
    from tests.s3server import S3Server
    from winnow import s3

    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    s3.client.cache_clear()
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3.client.cache_clear()


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """The micro demo pipeline (recipe clip_score_top30) in a throwaway git repo, run once per
    session by `winnow run`. Read-only: a test that changes anything works in a `project` copy."""
    root = tmp_path_factory.mktemp("e2e")
    proj = make_project(root / "built", MICRO_PARAMS, dvc_cache=root / "dvc-cache")
    proc = winnow(proj, "run")
    assert "report: " in proc.stdout and "index.html" in proc.stdout
    return proj


@pytest.fixture
def project(built, tmp_path):
    """This test's own copy of the built project."""
    return copy_project(built, tmp_path / "project")


@pytest.fixture(scope="session")
def swept(built, tmp_path_factory):
    """A copy of the built project committed as the baseline, then two `dvc exp run` points with
    other recipes (POINTS, in order). Returns the project and each point's `dvc exp run` process."""
    proj = copy_project(built, tmp_path_factory.mktemp("swept") / "project")
    git(proj, "add", "-A")
    git(proj, "commit", "-qm", "baseline")
    procs = {name: dvc(proj, "exp", "run", "-S", f"filter.recipe={recipe}", "-n", name, check=True)
             for name, recipe in POINTS}
    return proj, procs


@pytest.fixture(scope="session")
def swept_project(swept):
    return swept[0]
