"""Evaluation task suites: the registry schema, and the demo suite generated in the
DataComp / clip_benchmark webdataset layout::

    <root>/<task>/classnames.txt
    <root>/<task>/zeroshot_classification_templates.txt
    <root>/<task>/{test,train}/nshards.txt
    <root>/<task>/{test,train}/{i}.tar      # <key>.jpg + <key>.cls (class index) | <key>.txt (captions)

The ``train`` split is what distribution alignment may use; ``test`` images are only evaluated on.
"""
from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

from winnow.config import CONFIGS, load_yaml, validate_model
from winnow.io import atomic_dir, atomic_file, local, write_json
from winnow.pool import shards, world
from winnow.pool.world import Scene


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
    type: Literal["zeroshot_classification", "retrieval", "association"]
    main_metric: str | None
    group: str
    random_score: float | None = None
    size: int | None = None
    source: str | None = None     # where the real set comes from (HF dataset id), for users with network
    groups: Groups | None = None
    demo: dict | None = None


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tasks: list[Task]


def load_suite(name: str) -> Suite:
    p = CONFIGS / "tasks" / f"{name}.yaml"
    if not p.exists():
        valid = sorted(x.stem for x in (CONFIGS / "tasks").glob("*.yaml"))
        raise ValueError(f"unknown eval.suite '{name}' (valid: {', '.join(valid)})")
    return validate_model(Suite, load_yaml(p), str(p))


COLOUR_SHAPE = [f"{c} {s}" for c in world.COLOURS for s in world.SHAPES]
COUNT_CLASSES = ["one object", "two objects", "three objects", "four objects"]
TEMPLATES = {
    "colour_shape": ["a photo of a {c}.", "a {c}.", "clip art of a {c}.", "an image of a {c} shape."],
    "colour": ["a photo of a {c} shape.", "a {c} object.", "clip art of {c} shapes.", "something {c}."],
    "shape": ["a photo of a {c}.", "a {c}.", "a drawing of a {c}.", "clip art of a {c}."],
    "count": ["a photo of {c}.", "{c}.", "a picture with {c}.", "an image showing {c}."],
}


def generate_task(task: Task, root: str, seed: int, n_test: int, n_train: int) -> dict:
    """Render one demo task into ``root/<key>`` (atomic). Returns sha256 of every image written."""
    spec = task.demo or {}
    label = spec.get("label")
    rng = np.random.default_rng([seed, 7, int(hashlib.md5(task.key.encode()).hexdigest()[:8], 16)])
    classes = {"colour_shape": COLOUR_SHAPE, "count": COUNT_CLASSES, "colour": list(world.COLOURS),
               "shape": list(world.SHAPES)}.get(label, [])
    hashes = []
    with atomic_dir(local(root) / task.key) as tmp:
        if classes:
            (tmp / "classnames.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")
            (tmp / "zeroshot_classification_templates.txt").write_text(
                "\n".join(TEMPLATES[label]) + "\n", encoding="utf-8")
        for split, n in (("test", n_test), ("train", n_train)):
            if n == 0:
                continue
            samples = []
            for i in tqdm(range(n), desc=f"task {task.key}/{split}", unit="img", mininterval=2):
                scene = Scene.random(rng)
                scene.outline = bool(spec.get("outline"))
                if label == "colour_shape":
                    cls = i % len(classes)
                    colour, shape = classes[cls].split(" ")
                    scene.colour, scene.shape = colour, shape
                    if scene.background == colour:
                        scene.background = "gray" if colour != "gray" else "white"
                elif label == "count":
                    cls = i % len(classes)
                    scene.count = cls + 1
                elif label == "colour":
                    cls = i % len(classes)
                    scene.colour = classes[cls]
                    if scene.background == scene.colour:
                        scene.background = "gray"
                elif label == "shape":
                    cls = i % len(classes)
                    scene.shape = classes[cls]
                img = world.jpeg(world.render(scene, rng))
                hashes.append(hashlib.sha256(img).hexdigest())
                s = {"__key__": f"s{i:06d}", "jpg": img}
                if classes:
                    s["cls"] = str(cls)
                else:   # retrieval: several captions per image, one per line
                    s["txt"] = "\n".join(world.caption_en(scene, rng) for _ in range(2))
                samples.append(s)
            split_dir = tmp / split
            split_dir.mkdir()
            import webdataset as wds

            with atomic_file(split_dir / "0.tar") as t:
                with wds.TarWriter(str(t), mtime=shards.FIXED_MTIME) as sink:
                    for s in samples:
                        sink.write(s)
            (split_dir / "nshards.txt").write_text("1\n")
        write_json(tmp / "task.json", task.model_dump() | {"classes": len(classes), "test": n_test, "train": n_train})
    return {"task": task.key, "sha256": hashes}
