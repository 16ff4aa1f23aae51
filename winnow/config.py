"""Pydantic models of params.yaml.

Every section forbids unknown keys, so a typo fails before any work starts, with the nearest valid
key suggested (``pool.num_sample`` -> "did you mean 'num_samples'?").
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from winnow.errors import WinnowError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


class ParamsError(WinnowError, ValueError):
    """params.yaml (or a recipe) does not validate; the message names every bad key. A stage and
    ``winnow check`` exit with ``exit_code`` (2: a config error, which no retry fixes)."""
    exit_code = 2


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Noise(Section):
    mismatched: float = Field(0.12, ge=0, le=1)
    non_english: float = Field(0.08, ge=0, le=1)
    scene_text: float = Field(0.08, ge=0, le=1)
    uninformative: float = Field(0.05, ge=0, le=1)
    bad_size: float = Field(0.07, ge=0, le=1)
    exact_duplicate: float = Field(0.03, ge=0, le=1)
    near_duplicate: float = Field(0.03, ge=0, le=1)

    @model_validator(mode="after")
    def _leaves_clean(self):
        total = sum(self.model_dump().values())
        if total >= 1:
            raise ValueError(f"the noise fractions sum to {total:g}: they must sum below 1 (the rest of the pool is clean)")
        return self


class ConceptParams(Section):
    """The demo pool's concept distribution (winnow.demo.world.Concepts); 0 and 0: the tasks' own,
    uniform one."""
    zipf: float = Field(0.0, ge=0, le=4)        # colour x shape concepts drawn with p ∝ rank^-zipf: a head and a tail
    off_task: float = Field(0.0, ge=0, lt=1)    # share of scenes showing shapes no task asks about


class PoolParams(Section):
    source: Literal["demo", "datacomp"] = "demo"
    uri: str = "data/pool"                   # datacomp: the download's --data_dir (metadata/ + shards/), or a
                                             # directory of winnow's per-shard {n:08d}.parquet/.npz/.tar
    metadata_uri: str | None = None          # datacomp: the metadata dir when it is not <uri>/metadata
    shards_uri: str | None = None            # datacomp: img2dataset's shards when not <uri>/shards
    min_downloaded: float = Field(0.5, ge=0, le=1)   # gate: share of metadata rows whose image downloaded (link rot is normal)
    num_samples: int = Field(4000, ge=1)
    shard_size: int = Field(1000, ge=1)
    trusted_samples: int = Field(2000, ge=1)
    image_size: int = Field(64, ge=16)
    noise: Noise = Noise()
    concepts: ConceptParams = ConceptParams()
    trusted_signs: float = Field(0.4, ge=0, le=1)   # share of the scorer's trusted pairs that show a sign and name its text
    loose_captions: float = Field(0.0, ge=0, le=1)  # share of clean and bad-size pool pairs whose alt text names only part of the scene
    text_on_objects: float = Field(0.0, ge=0, le=1)  # share of sign images (pool scene text, trusted signs) whose text is painted over a scene of objects
    max_unreadable_tars: float = Field(0.0, ge=0, lt=1)   # gate: share of shards whose tar may be truncated/corrupt


class Eval(Section):
    suite: str = "demo"                    # configs/tasks/<suite>.yaml (its `layout` says how data_root is read)
    data_root: str = "data/tasks"          # demo: written by the tasks stage; datacomp: download_evalsets.py's data_dir
    test_samples: int = Field(400, ge=1)   # per demo task
    train_samples: int = Field(400, ge=0)  # per demo task train split
    batch_size: int = Field(128, ge=1)
    workers: int = Field(1, ge=0)          # DataLoader processes decoding evaluation images (0: in the stage's process)
    device: str = "auto"                   # auto: cuda when available (bf16 autocast), else cpu (fp32); or cpu, cuda, cuda:N
    allow_partial: bool = False            # false: a missing evaluation set fails the tasks/evaluate gates; true: listed
    max_quarantined: float = Field(0.01, ge=0, le=1)   # gate: share of a task's images that may be corrupt/bombs


class ScorerTrain(Section):
    """DFN-style training of the filtering network on trusted pairs (used when pretrained is null)."""
    trusted_uri: str = "data/pool/trusted"   # webdataset shards of trusted pairs
    epochs: int = Field(8, ge=1)             # passes over the trusted set (steps = epochs x size / batch)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup: int = Field(20, ge=0)
    wd: float = Field(0.1, ge=0)


class Scorer(Section):
    model: str = "winnow-tiny"               # the architecture (model size): an open_clip name or configs/models/*.json
    pretrained: str | None = None            # null: train in-pipeline; an open_clip tag or a local checkpoint path
    name: str = "auto"                       # embedding key prefix; auto: DataComp's l14/b32 for OpenAI L/14, B/32
    min_auc: float = Field(0.75, ge=0, le=1)   # gate: matched vs mismatched separation on held-out pairs
    train: ScorerTrain = ScorerTrain()


class Embed(Section):
    batch_size: int = Field(256, ge=1)
    workers: int = Field(1, ge=0)          # DataLoader processes decoding and preprocessing shards
    devices: list[str] | Literal["auto"] = "auto"   # auto: every CUDA device, else cpu; several: one process each
    compile: bool | Literal["auto"] = "auto"        # torch.compile the image tower; auto: on CUDA only
    decode: Literal["pil", "tensor"] = "pil"         # pil: in the workers; tensor: on the model's device (nvjpeg on CUDA)


class Filter(Section):
    recipe: str | dict = "clip_score_top30"    # a name in configs/recipes, a path to a .yaml, or inline {name, steps, ...}
    overrides: dict[str, dict] = {}   # {step label: {field: value}}, e.g. {clip_score: {fraction: 0.2}}
    targets: dict[str, str | list[str]] = {}   # {task: embeddings file} for alignment steps, over the recipe's own `targets`
    min_kept: int = Field(1, ge=0)
    decide: Literal["survivors", "all"] = "survivors"   # survivors: a step decides what earlier steps kept
    decisions: bool = True            # decisions.parquet (per-sample verdicts and scores); false: uids.npy only
    executor: Literal["serial", "threads", "processes", "dask"] = "serial"   # dask: through Prefect's DaskTaskRunner
    workers: int = Field(1, ge=1)
    address: str | None = None        # dask scheduler, e.g. tcp://10.0.0.5:8786 (None: local cluster)


class Train(Section):
    scale: str = "tiny"
    seed: int = Field(0, ge=0, lt=2**32)   # numpy and torch take seeds in [0, 2^32)


class Tracking(Section):
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "winnow"


class Storage(Section):
    uri: str | None = None            # s3://bucket/prefix: every stage publishes its outputs there (winnow/publish.py)
    endpoint_url: str | None = None   # an S3-compatible store (else AWS_ENDPOINT_URL / WINNOW_S3_ENDPOINT / AWS)


class Params(Section):
    seed: int = Field(0, ge=0, lt=2**32)   # numpy and torch take seeds in [0, 2^32)
    pool: PoolParams = PoolParams()
    eval: Eval = Eval()
    scorer: Scorer = Scorer()
    embed: Embed = Embed()
    filter: Filter = Filter()
    train: Train = Train()
    tracking: Tracking = Tracking()
    storage: Storage = Storage()


def project_file(path: str | Path) -> Path:
    """A file a recipe names: as given (absolute, or relative to the project, the working
    directory), else a file the package itself ships (``configs/...`` of a recipe from
    CONFIGS/recipes, used from a project elsewhere)."""
    p = Path(path)
    if p.is_absolute() or p.exists() or not (ROOT / p).exists():
        return p
    return ROOT / p


def _suggest(model: type[BaseModel], loc: tuple) -> str:
    """'did you mean …' for an unknown key, from the fields of the model that holds it."""
    holder: type[BaseModel] | None = model
    for part in loc[:-1]:
        field = holder.model_fields.get(part) if holder else None
        ann = field.annotation if field else None
        holder = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    if holder is None:
        return ""
    valid = list(holder.model_fields)
    near = difflib.get_close_matches(str(loc[-1]), valid, n=1)
    hint = f"did you mean '{near[0]}'? " if near else ""
    return f" ({hint}valid keys: {', '.join(valid)})"


def problems(exc: ValidationError, model: type[BaseModel]) -> list[str]:
    """One line per error of a validation, unknown keys with the nearest valid key."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key '{where}'{_suggest(model, loc)}")
        else:
            lines.append(f"'{where}': {err['msg']} (got {err.get('input')!r})")
    return lines


def validate_model(model: type[BaseModel], data: dict, source: str):
    """Validate ``data`` against ``model``; raise ParamsError listing every problem with hints."""
    try:
        return model.model_validate(data or {})
    except ValidationError as exc:
        raise ParamsError(f"{source} is invalid:\n  " + "\n  ".join(problems(exc, model))) from None


def yaml_problem(exc: Exception, path: str | Path) -> str:
    """A YAML syntax error as one line, ``path:LINE:COL: problem`` (1-based, as editors count)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem, context = getattr(exc, "problem", None), getattr(exc, "context", None)
    what = problem or context or str(exc).splitlines()[0]
    if problem and context:
        what += f" ({context})"
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    return f"{where}: {what}"


MAX_YAML_NODES = 100_000   # a params file or recipe is a few hundred nodes, aliases expanded


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader (only plain data types are constructed), refusing a document whose
    aliases expand beyond MAX_YAML_NODES, or refer to themselves. A few KB of nested anchors (a
    "billion laughs") load as shared references and then blow up wherever the document is walked:
    flattened for MLflow, validated, dumped."""

    def construct_document(self, node):
        _check_expansion(node)
        return super().construct_document(node)


def _check_expansion(root) -> None:
    size: dict[int, int] = {}     # id(node) -> nodes below it, aliases expanded
    open_: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        kids = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else (
            node.value if isinstance(node, yaml.SequenceNode) else [])
        if done:
            open_.discard(id(node))
            size[id(node)] = 1 + sum(size[id(c)] for c in kids)
            if size[id(node)] > MAX_YAML_NODES:
                raise yaml.YAMLError(f"its aliases expand to more than {MAX_YAML_NODES:,} nodes")
        elif id(node) in open_:
            raise yaml.YAMLError("an alias refers to a node that contains it")
        elif id(node) not in size:
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in kids if id(c) not in size)


def safe_load(text, where: str | Path = "YAML"):
    """``yaml.safe_load`` with aliases bounded (_BoundedLoader); a syntax error, an alias bomb or
    nesting too deep for the parser is a ParamsError naming ``where``."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)   # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ParamsError(yaml_problem(exc, where)) from None
    except RecursionError:
        raise ParamsError(f"{where}: nested too deeply") from None


def load_yaml(path: str | Path) -> dict:
    """A YAML file (safe loader); a syntax error is a ParamsError ``path:LINE:COL: problem``."""
    with open(path, encoding="utf-8") as fh:
        return safe_load(fh, path) or {}


def load_params(path: str | Path = "params.yaml") -> Params:
    return validate_model(Params, load_yaml(path), str(path))


def load_scale(name: str) -> dict:
    scales = load_yaml(CONFIGS / "scales.yaml")
    if name not in scales:
        raise ParamsError(f"unknown train.scale '{name}' (valid: {', '.join(scales)})")
    return scales[name]


def set_params(path: str | Path, updates: dict[str, object]) -> None:
    """Set dotted scalar keys in params.yaml in place, keeping its comments (what `dvc exp run -S`
    does to the workspace); the result is validated and written atomically."""
    import io

    from ruamel.yaml import YAML

    from winnow.io import atomic_file

    rt = YAML()   # round-trip: comments, key order and quoting stay as written
    rt.width = 4096   # never fold a long value onto a second line
    # params.yaml spells None `null`; ruamel's default would leave the value empty
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    load_yaml(path)   # a syntax error: one line with its place, before ruamel's traceback could
    data = rt.load(Path(path).read_text(encoding="utf-8"))
    for dotted, value in updates.items():
        node = data
        for key in dotted.split("."):
            if not isinstance(node, dict) or key not in node:
                raise ParamsError(f"cannot set '{dotted}': key '{key}' not found in {path}")
            parent, node = node, node[key]
        parent[key] = value
    buf = io.StringIO()
    rt.dump(data, buf)
    text = buf.getvalue()
    validate_model(Params, safe_load(text, path), f"{path} with {updates}")
    with atomic_file(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
