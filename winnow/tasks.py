"""Evaluation task suites: the registry schema, where a suite's data lives, how it is read, and
the demo suite generator.

Where the data lives is the suite's ``layout`` (``configs/tasks/<suite>.yaml``):

``demo`` — written by the tasks stage, one directory per task key::

    <root>/<key>/classnames.txt
    <root>/<key>/zeroshot_classification_templates.txt
    <root>/<key>/{test,train}/nshards.txt
    <root>/<key>/{test,train}/{i}.tar      # <k>.jpg + <k>.cls (class index) | <k>.txt (captions)

``datacomp`` — exactly what DataComp's ``download_evalsets.py`` writes into its data_dir::

    <root>/wds_<name>_test/            <name>: the key without a 'fairness/' prefix, '/' -> '-'
                                       (wds_imagenet1k_test, wds_vtab-cifar100_test, wds_dollar_street_test)
        classnames.txt, zeroshot_classification_templates.txt (one per line, ``{c}`` templates),
        test/nshards.txt, test/{0..n-1}.tar   (clip_benchmark's build_wds_dataset layout: images
        .webp/.png/.jpg/.jpeg, labels .cls, WILDS/fairness metadata rows .npy)
    <root>/hf_cache/                   the ``datasets`` cache of nlphuji/<name> for the keys
                                       retrieval/<name> and misc/<name> (Flickr30k 1k, MSCOCO 5k,
                                       WinoGAViL), read offline with load_dataset(..., cache_dir=)

Reading streams batches (``iter_split``). Tar members are parsed in memory, never extracted, and
decoded through an allowlist: images (webp/png/jpg/jpeg, preferred in clip_benchmark's order), ``cls``
(int), ``txt`` (utf-8), ``json``, ``npy`` (``allow_pickle=False``). Any other member — ``.pyd`` and
``.pickle``, which webdataset's default decoders would ``pickle.loads`` — is skipped unread and
counted. An image that does not decode, or that PIL refuses as a decompression bomb, is quarantined:
counted and named, never a crash. With ``workers > 0`` decoding and preprocessing run in spawned
DataLoader worker processes, each holding one batch at a time, so memory does not grow with a set's
size. A ``train`` split (demo layout) is what distribution alignment may use; ``test`` images are
only evaluated on.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from winnow.errors import WinnowError
from winnow import decode, jobs
from winnow.config import CONFIGS, load_yaml, validate_model
from winnow.io import local


class MissingTask(WinnowError, FileNotFoundError):
    """A task's data is absent or unusable: the task is reported missing, never scored zero."""


class Groups(BaseModel):
    """Worst-group accuracy: each test sample's ``.npy`` metadata row (DataComp / WILDS layout) is
    grouped by column ``field``; ``exclude`` group ids do not count; metrics are named
    ``acc_<suffix>`` and ``acc_top5_<suffix>``."""
    model_config = ConfigDict(extra="forbid")
    field: int = 0
    exclude: list[int] = []
    suffix: str = "wg"


class Task(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str
    name: str
    # association: WinoGAViL (a cue, 5-12 candidate images, the associated subset)
    # fairface: DataComp's fairness evaluation of FairFace / UTKFace (race, gender, age and toxicity
    #           objectives; classnames and templates prefixed '<objective>:'); no main metric
    type: Literal["zeroshot_classification", "retrieval", "association", "fairface"]
    main_metric: str | None
    group: str
    random_score: float | None = None
    size: int | None = None
    source: str | None = None     # where the real set comes from (HF dataset id), for users with network
    groups: Groups | None = None
    demo: dict | None = None


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layout: Literal["demo", "datacomp"] = "demo"   # how eval.data_root is laid out (module docstring)
    tasks: list[Task]


def load_suite(name: str) -> Suite:
    p = CONFIGS / "tasks" / f"{name}.yaml"
    if not p.exists():
        valid = sorted(x.stem for x in (CONFIGS / "tasks").glob("*.yaml"))
        raise ValueError(f"unknown eval.suite '{name}' (valid: {', '.join(valid)})")
    return validate_model(Suite, load_yaml(p), str(p))


# ---------------------------------------------------------------------------------------------
# where a task's data lives

HF_PREFIXES = ("retrieval/", "misc/")   # DataComp reads these keys with the datasets library


def wds_dir_name(key: str) -> str:
    """download_evalsets.py's directory for a webdataset task: ``fairness/`` dropped, ``/`` -> ``-``."""
    name = key.split("/", 1)[1] if key.startswith("fairness/") else key
    return f"wds_{name.replace('/', '-')}_test"


def hf_dataset_id(key: str) -> str:
    """download_evalsets.py / retr_eval.py / wino_eval.py: ``nlphuji/<key after its first '/'>``."""
    return f"nlphuji/{key.split('/', 1)[1]}"


@dataclass(frozen=True)
class TaskData:
    """Where one task's data is: ``kind`` wds (``path`` = the task directory) or hf (``path`` = the
    datasets cache directory, ``dataset_id`` = the Hub id it was downloaded as)."""
    key: str
    kind: Literal["wds", "hf"]
    path: Path
    dataset_id: str | None = None

    def hf_dir(self) -> Path:
        """The cache's own directory of this dataset (``<namespace>___<name>``)."""
        return self.path / "___".join(self.dataset_id.split("/"))


def task_data(task: Task, data_root: str | os.PathLike, layout: str = "demo") -> TaskData:
    root = local(data_root)
    if layout == "datacomp":
        if task.key.startswith(HF_PREFIXES):
            return TaskData(task.key, "hf", root / "hf_cache", hf_dataset_id(task.key))
        return TaskData(task.key, "wds", root / wds_dir_name(task.key))
    if layout != "demo":
        raise ValueError(f"unknown suite layout '{layout}' (valid: demo, datacomp)")
    return TaskData(task.key, "wds", root / task.key)


def read_lines(path: Path) -> list[str]:
    """clip_benchmark's reading of classnames.txt and the templates: every line, stripped."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


def read_zeroshot_text(task_dir: Path) -> tuple[list[str], list[str]]:
    """Class names and ``{c}`` templates of a classification task (clip_benchmark layout)."""
    out = []
    for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
        if not (Path(task_dir) / name).is_file():
            raise MissingTask(f"{Path(task_dir) / name} not found")
        out.append(read_lines(Path(task_dir) / name))
    if not out[0] or not out[1]:
        raise MissingTask(f"{task_dir}: classnames.txt or zeroshot_classification_templates.txt is empty")
    return out[0], out[1]


def split_shards(task_dir: Path, split: str = "test") -> list[Path]:
    """``<task_dir>/<split>/{0..n-1}.tar`` from nshards.txt; every one must be there."""
    d = Path(task_dir) / split
    nfile = d / "nshards.txt"
    if not nfile.is_file():
        raise MissingTask(f"{d} has no nshards.txt")
    try:
        n = int(nfile.read_text().strip())
    except ValueError:
        raise MissingTask(f"{nfile} does not hold a shard count: {nfile.read_text()[:40]!r}") from None
    if n < 1:
        raise MissingTask(f"{d}: nshards.txt says {n}")
    tars = [d / f"{i}.tar" for i in range(n)]
    absent = [t.name for t in tars if not t.is_file() or t.stat().st_size == 0]
    if absent:
        raise MissingTask(f"{d}: nshards.txt says {n} but {len(absent)} tar(s) are absent or empty: {absent[:5]}")
    return tars


# ---------------------------------------------------------------------------------------------
# tar members and their decoding (an allowlist; nothing is ever unpickled)

IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")    # clip_benchmark's preference order
ALLOWED = frozenset(IMAGE_EXTS + ("cls", "txt", "json", "npy"))
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")   # webdataset's split: key = path up to the basename's first dot


class BadMember(ValueError):
    """One sample's member does not decode; ``reason`` is 'decompression_bomb', 'corrupt_image'
    or 'bad_<suffix>'. The sample is quarantined."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def tar_complete(path: Path) -> bool:
    """A tar ends with zero blocks; a download cut short does not (tarfile itself stops quietly at
    a cut at a header boundary)."""
    size = path.stat().st_size
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as fh:
        fh.seek(size - 1024)
        return fh.read(1024) == bytes(1024)


def iter_tar(path: Path) -> Iterator[tuple[str, dict[str, bytes], int]]:
    """``(key, {suffix: bytes}, skipped)`` per sample of a webdataset tar, consecutive members
    grouped by key as webdataset groups them (suffixes lower-cased). Only allowlisted members are
    read; ``skipped`` counts the sample's other members. A truncated or corrupt tar raises
    MissingTask."""
    if not tar_complete(path):
        raise MissingTask(f"{path} is truncated or not a tar (no end-of-archive blocks)")
    key, members, skipped = None, {}, 0
    try:
        with decode.open_tar_stream(str(path)) as tf:
            for m in tf:
                if not m.isreg():
                    continue
                match = _KEY.match(m.name)
                if not match:
                    continue
                k, suffix = match.group(1), match.group(2).lower()
                if k != key:
                    if members or skipped:
                        yield key, members, skipped
                    key, members, skipped = k, {}, 0
                if suffix.rsplit(".", 1)[-1] not in ALLOWED or m.size > decode.MAX_MEMBER_BYTES:
                    skipped += 1      # never read: another type, or too large to hold
                    continue
                members[suffix] = tf.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise MissingTask(f"{path} is not a readable tar: {exc}") from None
    if members or skipped:
        yield key, members, skipped


# The formats evaluation images come in: the pool's three, and those some datasets keep as they were
# published (GIF, BMP, PPM) in a `datasets` cache. Never TIFF, EPS or the like, whatever the suffix.
EVAL_IMAGE_FORMATS = decode.IMAGE_FORMATS + ("GIF", "BMP", "PPM")


def decode_image(data: bytes):
    """An RGB PIL image (what clip_benchmark's ImageHandler('pil') returns), through the pool's safe
    decode (winnow.decode.open_image): the header's pixel count is checked before any pixel is."""
    try:
        return decode.open_image(data, formats=EVAL_IMAGE_FORMATS)
    except decode.ImageTooLarge as exc:
        raise BadMember("decompression_bomb", str(exc)) from None
    except decode.ImageError as exc:
        raise BadMember("corrupt_image", str(exc)) from None


def decode_member(suffix: str, data: bytes):
    """Decode one allowlisted member by its last extension; BadMember when it does not decode."""
    ext = suffix.rsplit(".", 1)[-1]
    try:
        if ext in IMAGE_EXTS:
            return decode_image(data)
        if ext == "cls":
            return int(data.decode("ascii").strip())
        if ext == "txt":
            return data.decode("utf-8")
        if ext == "json":
            return json.loads(data)
        if ext == "npy":
            return np.load(io.BytesIO(data), allow_pickle=False)
    except BadMember:
        raise
    except Exception as exc:
        raise BadMember(f"bad_{ext}", f"{type(exc).__name__}: {exc}") from None
    raise BadMember(f"bad_{ext}", "member type not in the allowlist")


def image_suffix(members: dict) -> str | None:
    return next((s for s in IMAGE_EXTS if s in members), None)


# ---------------------------------------------------------------------------------------------
# the datasets cache (Flickr, MSCOCO, WinoGAViL)

HF_COLUMNS = {"retrieval": ["image", "caption"], "association": ["candidate_images", "cue", "candidates", "associations"]}


def load_hf(data: TaskData, columns: list[str] = ()):
    """``datasets.load_dataset(<id>, split="test", cache_dir=<data_root>/hf_cache)`` offline, as
    DataComp's retr_eval.py / wino_eval.py call it; MissingTask when it is not there."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if not data.hf_dir().is_dir():
        raise MissingTask(f"{data.dataset_id} is not in the datasets cache {data.path} (no {data.hf_dir().name}/)")
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(data.dataset_id, split="test", cache_dir=str(data.path))
    except Exception as exc:
        raise MissingTask(f"{data.dataset_id} does not load offline from {data.path}: "
                          f"{type(exc).__name__}: {str(exc)[:300]}") from None
    lacking = [c for c in columns if c not in ds.column_names]
    if lacking:
        raise MissingTask(f"{data.dataset_id} in {data.path} lacks column(s) {lacking} (has {ds.column_names})")
    if len(ds) == 0:
        raise MissingTask(f"{data.dataset_id} in {data.path}: the test split is empty")
    return ds


def _hf_image_bytes(value) -> bytes:
    """The encoded bytes of a datasets Image value read raw from Arrow ({bytes, path})."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path") and os.path.isfile(value["path"]):
            with open(value["path"], "rb") as fh:
                return fh.read()
    raise BadMember("corrupt_image", "no image bytes and no readable path")


# ---------------------------------------------------------------------------------------------
# streaming a split in batches

@dataclass
class Batch:
    """One batch of a split. ``images``: a (B, C, H, W) tensor when a transform is given, else a
    list of RGB PIL images; association batches concatenate each instance's candidate images
    (``sizes`` per instance). ``quarantined``: (key, reason) of the samples skipped since the
    previous batch; ``error``: the split cannot be evaluated (raised as MissingTask by readers)."""
    keys: list[str] = field(default_factory=list)
    images: object = None
    labels: np.ndarray | None = None
    meta: list[np.ndarray] | None = None
    captions: list[list[str]] | None = None
    cues: list[str] | None = None
    sizes: list[int] | None = None
    truths: list[np.ndarray] | None = None
    quarantined: list[tuple[str, str]] = field(default_factory=list)
    skipped_members: int = 0
    error: str | None = None


KINDS = ("classification", "retrieval", "association", "fairface", "images")


def default_kind(task: Task) -> str:
    return {"zeroshot_classification": "classification", "retrieval": "retrieval",
            "association": "association", "fairface": "fairface"}[task.type]


class _Accumulator:
    def __init__(self, kind: str, transform, batch_size: int):
        self.kind, self.transform, self.batch_size = kind, transform, batch_size
        self.reset()

    def reset(self):
        self.keys, self.images, self.labels, self.meta, self.captions = [], [], [], [], []
        self.cues, self.sizes, self.truths, self.quarantined, self.skipped = [], [], [], [], 0

    def _x(self, img):
        return self.transform(img) if self.transform is not None else img

    def add(self, rec: dict) -> None:
        self.keys.append(rec["key"])
        if self.kind == "association":
            self.images += [self._x(im) for im in rec["images"]]
            self.sizes.append(len(rec["images"]))
            self.cues.append(rec["cue"])
            self.truths.append(rec["truth"])
            return
        self.images.append(self._x(rec["image"]))
        self.labels.append(rec.get("label", -1))
        self.meta.append(rec.get("meta"))
        self.captions.append(rec.get("captions"))

    def full(self) -> bool:
        return len(self.images) >= self.batch_size

    def pending(self) -> bool:
        return bool(self.keys or self.quarantined or self.skipped)

    def flush(self) -> Batch:
        imgs = self.images
        if self.transform is not None and imgs:
            imgs = torch.stack(imgs)
            if torch.utils.data.get_worker_info() is not None:
                # leave a worker as a plain array (pickled through the pipe): a tensor would travel as a
                # shared-memory segment, and receiving one per batch grew the main process's RSS by
                # ~500 MB over 50,000 images (bench/eval_rss.py); an array keeps it flat
                imgs = imgs.numpy()
        b = Batch(keys=self.keys, images=imgs, quarantined=self.quarantined, skipped_members=self.skipped)
        if self.kind == "association":
            b.cues, b.sizes, b.truths = self.cues, self.sizes, self.truths
        else:
            b.labels = np.array(self.labels, np.int64)
            b.meta = self.meta if any(m is not None for m in self.meta) else None
            b.captions = self.captions if any(c is not None for c in self.captions) else None
        self.reset()
        return b


class SplitStream(torch.utils.data.IterableDataset):
    """Batches of one split of one task (see ``iter_split``). Constructed in the caller's process,
    where a missing set raises MissingTask at once; iterated in DataLoader workers. Each worker
    takes every n-th tar (every n-th sample when there are fewer tars than workers) or every n-th
    block of dataset rows."""

    def __init__(self, data: TaskData, split: str, kind: str, transform=None, batch_size: int = 256,
                 need_meta: bool = False):
        if kind not in KINDS:
            raise ValueError(f"unknown kind '{kind}' (valid: {', '.join(KINDS)})")
        self.data, self.split, self.kind, self.transform = data, split, kind, transform
        self.batch_size, self.need_meta = batch_size, need_meta
        self.tars, self.ds = [], None
        if data.kind == "wds":
            self.tars = split_shards(data.path, split)
        else:
            if split != "test":
                raise MissingTask(f"{data.dataset_id}: DataComp's copy has a test split only, not '{split}'")
            hf_kind = "association" if kind == "association" else "retrieval"
            self.ds = load_hf(data, HF_COLUMNS[hf_kind] if kind != "images" else ["image"])
        self.rows_per_block = max(1, batch_size // 8) if kind == "association" else batch_size

    def nbytes(self) -> int:
        """The split's size on disk (its tars, or the dataset's Arrow files)."""
        if self.ds is not None:
            return sum(os.path.getsize(f["filename"]) for f in self.ds.cache_files)
        return sum(t.stat().st_size for t in self.tars)

    def units(self) -> int:
        """How many workers can be kept busy."""
        if self.ds is not None:
            return -(-len(self.ds) // self.rows_per_block)
        return max(len(self.tars), 1 << 30)   # few tars: workers split the samples instead

    # -- records -------------------------------------------------------------------------------
    def _wds_record(self, key: str, m: dict) -> dict:
        """A decoded sample; BadMember quarantines it; MissingTask means the set is unusable."""
        rec = {"key": key}
        if self.kind == "association":
            spec = decode_member("json", m["json"]) if "json" in m else None
            if not isinstance(spec, dict) or not {"cue", "candidates", "associations"} <= set(spec):
                raise MissingTask(f"{self.data.path}: sample {key} has no json {{cue, candidates, associations}}")
            if not (isinstance(spec["cue"], str) and isinstance(spec["candidates"], list)
                    and isinstance(spec["associations"], list)):
                raise BadMember("bad_json", "cue must be text, candidates and associations lists")
            imgs = []
            for i in range(len(spec["candidates"])):
                s = next((f"{i}.{e}" for e in IMAGE_EXTS if f"{i}.{e}" in m), None)
                if s is None:
                    raise MissingTask(f"{self.data.path}: sample {key} lacks candidate image {i}")
                imgs.append(decode_member(s, m[s]))
            return rec | {"images": imgs, "cue": spec["cue"],
                          "truth": np.isin(spec["candidates"], spec["associations"])}
        s = image_suffix(m)
        if s is None:
            raise BadMember("no_image")
        if self.kind == "classification":
            if "cls" not in m:
                raise MissingTask(f"{self.data.path}: sample {key} has no .cls label")
            rec["label"] = decode_member("cls", m["cls"])
        if (self.kind == "classification" and self.need_meta) or self.kind == "fairface":
            if "npy" not in m:
                raise MissingTask(f"{self.data.path}: sample {key} has no .npy metadata"
                                  + (" for worst-group accuracy" if self.kind == "classification" else ""))
            rec["meta"] = np.asarray(decode_member("npy", m["npy"])).reshape(-1)
        if self.kind == "retrieval":
            if "txt" not in m:
                raise MissingTask(f"{self.data.path}: sample {key} has no .txt captions")
            rec["captions"] = [c for c in decode_member("txt", m["txt"]).split("\n") if c.strip()]
        if self.kind == "images":
            if "cls" in m:
                rec["label"] = decode_member("cls", m["cls"])
            if "txt" in m:
                rec["captions"] = [c for c in decode_member("txt", m["txt"]).split("\n") if c.strip()]
            if "npy" in m:
                rec["meta"] = np.asarray(decode_member("npy", m["npy"])).reshape(-1)
        rec["image"] = decode_member(s, m[s])   # last: the costly part, only for an otherwise usable sample
        return rec

    def _hf_record(self, row: dict, index: int) -> dict:
        key = str(index)
        if self.kind == "association":
            imgs = [decode_image(_hf_image_bytes(v)) for v in row["candidate_images"]]
            return {"key": key, "images": imgs, "cue": row["cue"],
                    "truth": np.isin(row["candidates"], row["associations"])}
        caps = row.get("caption")
        caps = [caps] if isinstance(caps, str) else list(caps or [])
        return {"key": key, "image": decode_image(_hf_image_bytes(row["image"])), "captions": caps}

    # -- iteration -----------------------------------------------------------------------------
    def _records(self, wid: int, nw: int, stats: dict):
        """``(record | None, (key, reason) | None)`` for this worker's share; ``stats`` counts
        skipped members."""
        if self.ds is not None:
            table = self.ds.with_format("arrow")
            starts = list(range(0, len(self.ds), self.rows_per_block))[wid::nw]
            for start in starts:
                cols = table[start: start + self.rows_per_block].to_pydict()
                for j in range(len(next(iter(cols.values())))):
                    row = {c: v[j] for c, v in cols.items()}
                    try:
                        yield self._hf_record(row, start + j), None
                    except BadMember as exc:
                        yield None, (str(start + j), exc.reason)
            return
        by_sample = len(self.tars) < nw
        mine = self.tars if by_sample else self.tars[wid::nw]
        i = -1
        for tar in mine:
            for key, members, skipped in iter_tar(tar):
                i += 1
                if by_sample and i % nw != wid:
                    continue
                stats["skipped_members"] += skipped
                if not members:
                    continue
                try:
                    yield self._wds_record(f"{tar.name}/{key}", members), None
                except BadMember as exc:
                    yield None, (f"{tar.name}/{key}", exc.reason)

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        acc = _Accumulator(self.kind, self.transform, self.batch_size)
        stats = {"skipped_members": 0}
        try:
            for rec, bad in self._records(wid, nw, stats):
                if bad is not None:
                    acc.quarantined.append(bad)
                    continue
                acc.add(rec)
                if acc.full():
                    acc.skipped, stats["skipped_members"] = stats["skipped_members"], 0
                    yield acc.flush()
        except MissingTask as exc:
            yield Batch(error=str(exc))
            return
        acc.skipped = stats["skipped_members"]
        if acc.pending():
            yield acc.flush()


WORKERS_MIN_BYTES = 16 << 20   # a smaller split is decoded in the caller's process: starting workers costs more


def worker_context():
    """DataLoader workers are spawned, not forked: a worker must not inherit the stage's threads
    and handles (MLflow, Prefect). A fork server preloading torch starts workers in under a second
    instead of ~10 s, but keeps one more process with torch's pages resident: +~400 MB of summed RSS
    for a 1-worker evaluation (bench/eval_rss.py), which matters more than seconds per task at real
    size; small splits skip workers altogether (WORKERS_MIN_BYTES)."""
    import multiprocessing as mp

    return mp.get_context("spawn")


def iter_split(task: Task, data_root: str | os.PathLike, split: str = "test", transform=None,
               batch_size: int = 256, workers: int = 0, layout: str = "demo", kind: str | None = None,
               pin_memory: bool = False) -> Iterator[Batch]:
    """Stream one split of ``task`` in batches (``Batch``: images, labels, metadata rows, captions,
    quarantined samples). ``transform`` (e.g. open_clip's preprocess) runs where the images are
    decoded: in ``workers`` spawned DataLoader processes, or in this one when ``workers`` is 0.
    ``kind``: what each sample must hold — classification (image + cls [+ npy with task.groups]),
    retrieval (image + captions), association (WinoGAViL instances), fairface (image + npy), or
    images (an image, with cls/txt/npy when present: for alignment targets); default from the task
    type. A split under WORKERS_MIN_BYTES is read in this process whatever ``workers`` says. Raises
    MissingTask when the split is absent or unusable (at once, or when reached)."""
    kind = kind or default_kind(task)
    data = task_data(task, data_root, layout)
    stream = SplitStream(data, split, kind, transform, batch_size, need_meta=task.groups is not None)
    n = min(workers, stream.units()) if stream.nbytes() >= WORKERS_MIN_BYTES else 0
    if n == 0:
        batches = iter(stream)
    else:
        batches = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=n, prefetch_factor=2,
                                                   multiprocessing_context=worker_context(),
                                                   persistent_workers=False, pin_memory=pin_memory))
    for b in batches:
        if b.error:
            raise MissingTask(b.error)
        if isinstance(b.images, np.ndarray):
            b.images = torch.from_numpy(b.images)
        yield b


def iter_samples(task_dir: Path, split: str = "test") -> Iterator[dict]:
    """Decoded samples of a webdataset split, one dict per sample keyed by member suffix (images as
    RGB PIL); samples with a member that does not decode are skipped. The shards are checked at
    the call, so a missing split raises MissingTask at once."""
    tars = split_shards(Path(task_dir), split)

    def gen():
        for tar in tars:
            for key, members, _ in iter_tar(tar):
                if not members:
                    continue
                try:
                    yield {"__key__": key} | {s: decode_member(s, d) for s, d in members.items()}
                except BadMember:
                    continue
    return gen()


# ---------------------------------------------------------------------------------------------
# a suite's sets: presence (the tasks stage) and fingerprints (evaluation resume keys)

def fingerprint(data: TaskData) -> str:
    """A hash of a task's files' content identity (winnow.jobs: content hashes of small files,
    sizes and mtimes of large ones; a changed, added or removed file changes it). The datasets
    cache's lock files, which loading touches, do not count."""
    base = data.hf_dir() if data.kind == "hf" else data.path
    if not base.is_dir():
        return "absent"
    return jobs.digest(jobs.content_identity(base, ignore=loading_noise), 64)


def loading_noise(name: str) -> bool:
    """Files that reading an evaluation set writes (the datasets cache's locks and partial
    downloads): not part of the set's identity."""
    return name.endswith(".lock") or ".incomplete" in name


def check_set(task: Task, data_root: str | os.PathLike, layout: str) -> dict:
    """Is a task's test set there and readable? Checks the files without decoding the set: the
    class names and templates, nshards.txt and every tar (present, complete), the first sample's
    members; for a datasets-cache set, that it loads offline with the columns DataComp reads."""
    data = task_data(task, data_root, layout)
    row = {"task": task.key, "kind": data.kind, "path": str(data.path if data.kind == "wds" else data.hf_dir()),
           "status": "present", "reason": "", "shards": 0, "bytes": 0, "rows": None}
    try:
        if data.kind == "hf":
            kind = "association" if task.type == "association" else "retrieval"
            ds = load_hf(data, HF_COLUMNS[kind])
            row["rows"] = len(ds)
            row["bytes"] = sum(os.path.getsize(f["filename"]) for f in ds.cache_files)
            return row
        if not data.path.is_dir():
            raise MissingTask(f"{data.path} does not exist")
        if task.type in ("zeroshot_classification", "fairface"):
            read_zeroshot_text(data.path)
        tars = split_shards(data.path, "test")
        bad = [t.name for t in tars if not tar_complete(t)]
        if bad:
            raise MissingTask(f"{data.path / 'test'}: {len(bad)} tar(s) truncated: {bad[:5]}")
        row["shards"], row["bytes"] = len(tars), sum(t.stat().st_size for t in tars)
        key, members, _ = next(iter_tar(tars[0]), (None, {}, 0))
        need = {"zeroshot_classification": ["cls"] + (["npy"] if task.groups else []), "fairface": ["npy"],
                "retrieval": ["txt"], "association": ["json"]}[task.type]
        lacking = [s for s in need if s not in members]
        if task.type != "association" and image_suffix(members) is None:
            lacking.append("image (" + "/".join(IMAGE_EXTS) + ")")
        if lacking:
            raise MissingTask(f"{tars[0]}: first sample {key} lacks {lacking} (has {sorted(members)})")
    except MissingTask as exc:
        row.update(status="missing", reason=str(exc))
    return row
