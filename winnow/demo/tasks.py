"""The demo evaluation suite: each task rendered from the demo world into ``<root>/<key>`` in the
``demo`` layout that winnow.tasks reads (class names, templates, ``test``/``train`` webdataset
splits), from its own seeded stream, so evaluation images never appear in the pool."""
from __future__ import annotations

import hashlib

import numpy as np
from tqdm import tqdm

from winnow.demo import world
from winnow.demo.world import Scene
from winnow.io import atomic_dir, atomic_file, local, write_json
from winnow.pool import shards
from winnow.tasks import Task


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
    colour_shape = [f"{c} {s}" for c in world.COLOURS for s in world.SHAPES]
    classes = {"colour_shape": colour_shape, "count": COUNT_CLASSES, "colour": list(world.COLOURS),
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
