"""dvc.yaml is the one declaration of each stage, and it tells the truth: its deps cover the code the
stage imports (so an edit re-runs it), its params exist, every stage module has a stage, and the DAG
order winnow derives is DVC's own."""
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from winnow import dvcfile
from winnow.imports import ROOT, import_closure

DVC_YAML = ROOT / "dvc.yaml"
STAGES = list(dvcfile.stages(DVC_YAML))
DVC = Path(sys.executable).parent / "dvc"


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", STAGES)
def test_import_closure_lies_inside_deps(stage):
    deps = dvcfile.deps(stage, DVC_YAML)
    missing = [f for f in import_closure(f"stages.{stage}") if not _covered(f, deps)]
    assert not missing, f"dvc.yaml stage {stage} imports these but does not list them in deps: {missing}"


@pytest.mark.parametrize("stage", STAGES)
def test_no_stale_code_deps(stage):
    """A .py dep the stage no longer imports re-runs it for nothing (or, once deleted, fails dvc)."""
    closure = set(import_closure(f"stages.{stage}"))
    stale = [d for d in dvcfile.deps(stage, DVC_YAML) if d.endswith(".py") and d not in closure]
    assert not stale, f"dvc.yaml stage {stage} lists deps it does not import: {stale}"


def _missing_keys(params: dict) -> list[str]:
    missing = []
    for stage in STAGES:
        whole = [p for p in dvcfile.stage(stage, DVC_YAML).get("params") or [] if isinstance(p, dict)]
        if any(v is None for p in whole for v in p.values()):
            continue   # `params.yaml:` (the whole file, whatever keys it has): nothing DVC could miss
        for key in dvcfile.params_keys(stage, DVC_YAML):
            node = params
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    missing.append(f"{stage}: {key}")
                    break
                node = node[part]
    return missing


def test_params_keys_exist_in_params_yaml():
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    missing = _missing_keys(params)
    assert not missing, f"dvc.yaml params missing from params.yaml (dvc fails on them): {missing}"


def test_params_keys_exist_in_the_test_projects_params():
    """The end-to-end projects write a shorter params.yaml (defaults left out): dvc fails there too."""
    from tests.helpers import MICRO_PARAMS

    missing = _missing_keys(MICRO_PARAMS)
    assert not missing, f"missing from MICRO_PARAMS: {missing}; list the whole section in dvc.yaml or add the key"


def test_every_stage_module_has_a_stage_and_vice_versa():
    modules = sorted(p.stem for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__")
    assert modules == sorted(STAGES)
    for stage in STAGES:
        assert dvcfile.stage(stage, DVC_YAML)["cmd"] == f"python -m stages.{stage}"


@pytest.mark.parametrize("stage", STAGES)
def test_stage_module_runs_main_under_its_own_name(stage):
    """stage.main takes the params from dvc.yaml by this name, so it must be the stage's."""
    tree = ast.parse((ROOT / "stages" / f"{stage}.py").read_text(encoding="utf-8"))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "main"]
    assert [ast.literal_eval(c.args[0]) for c in calls] == [stage]


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory):
    """dvc.yaml and params.yaml alone in a fresh DVC project: dvc reads the DAG without the data."""
    if not DVC.exists():
        pytest.skip("dvc is not installed")
    d = tmp_path_factory.mktemp("dvcdag")
    env = os.environ | {"DVC_NO_ANALYTICS": "1"}
    subprocess.run([str(DVC), "init", "--no-scm", "-q"], cwd=d, check=True, env=env)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, d / name)
    return d, env


def test_dag_and_order_match_dvc(dvc_project):
    d, env = dvc_project
    dot = subprocess.run([str(DVC), "dag", "--dot"], cwd=d, env=env, check=True, capture_output=True,
                         text=True).stdout
    edges = {tuple(x.strip().strip('"') for x in line.rstrip(";").split("->"))
             for line in dot.splitlines() if "->" in line}
    dag = dvcfile.dag(DVC_YAML)
    assert {(up, s) for s, ups in dag.items() for up in ups} == edges
    # the order `dvc repro` runs the stages in (--dry: nothing runs, no data needed)
    out = subprocess.run([str(DVC), "repro", "--dry", "--force"], cwd=d, env=env, check=True, capture_output=True,
                         text=True).stdout
    ran = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")]
    assert dvcfile.order(dag) == ran


def test_order_is_stable_and_names_a_cycle():
    assert dvcfile.order({"b": [], "a": [], "c": ["a"], "d": ["b"]}) == ["b", "a", "c", "d"]
    with pytest.raises(dvcfile.DvcYamlError, match="cycle: .*x -> y|cycle: .*y -> x"):
        dvcfile.order({"x": ["y"], "y": ["x"]})


def test_declared_outputs_strip_options():
    spec = {"outs": ["a", {"b": {"persist": True}}], "metrics": [{"m.json": None}], "plots": [{"p.csv": {"x": 1}}]}
    assert dvcfile.declared_outputs(spec) == ["a", "b", "m.json", "p.csv"]


def test_import_closure_resolves_every_import_form(tmp_path, monkeypatch):
    pkg = tmp_path / "winnow"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "import os\nfrom winnow import b, name_in_init\ndef f():\n    from .sub import c\n",
        "b.py": "from winnow.sub.d import thing\n",
        "unused.py": "",
        "sub/__init__.py": "from . import d\n",
        "sub/c.py": "from ..b import *\nimport winnow.e\n",
        "sub/d.py": "",
        "e.py": "",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    monkeypatch.setattr("winnow.imports.ROOT", tmp_path)
    assert import_closure("winnow.a") == sorted(f"winnow/{n}" for n in files if n != "unused.py")
