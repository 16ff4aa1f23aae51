"""A deterministic synthetic pool in exact DataComp layout, with labelled noise.

Writes, under the pool directory: ``{n:08d}.tar/.parquet/.npz`` + ``{n:08d}_stats.json`` per shard,
``truth.parquet`` (noise kind and scene attributes per uid; no filter reads it) and ``trusted/``
(clean pairs for training the in-pipeline scorer, never part of the pool).

The npz files hold stand-ins for OpenAI CLIP features (``b32_img``/``b32_txt``/``l14_img``/``l14_txt``):
unit vectors built from per-concept directions whose cosine equals the metadata's similarity score,
with per-noise-kind score distributions that imitate OpenAI CLIP's behaviour — including its
fondness for scene text, which is what the flipped-image score exists to defeat.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from winnow.config import PoolParams
from winnow.io import atomic_dir, write_json
from winnow.demo import world
from winnow.demo.world import Scene
from winnow.pool import shards

NOISE_KINDS = ["clean", "mismatched", "non_english", "scene_text", "uninformative", "bad_size",
               "exact_duplicate", "near_duplicate"]
# (mean, sd) of the simulated OpenAI B/32 cosine per kind; L/14 is ~0.035 lower (DataComp Table 16).
B32_SCORE = {"clean": (0.31, 0.035), "mismatched": (0.17, 0.03), "non_english": (0.22, 0.04),
             "scene_text": (0.34, 0.03), "uninformative": (0.19, 0.03), "bad_size": (0.29, 0.04),
             "loose": (0.26, 0.04)}   # a clean pair captioned loosely (pool.loose_captions)


@dataclass
class Sample:
    kind: str
    scene: Scene
    caption: str
    lang: str = "en"
    width: int = 0
    height: int = 0
    image: bytes = b""
    url: str = ""
    source: "Sample | None" = None   # for duplicates: the sample they copy
    caption_scene: Scene | None = None   # what the caption describes (mismatched: another scene)
    extra: dict = field(default_factory=dict)


def exact_dot(a, b) -> float:
    """``a @ b`` rounded once, exactly (math.fsum over the float64 products, which are exact for
    float16/float32 inputs). BLAS's dot kernels sum in an order that depends on the CPU's SIMD
    width and the thread count, so their last bits differ between machines; the pool writes these
    values (scores, and vectors derived from them) to disk, and must be byte-identical anywhere."""
    return math.fsum((np.asarray(a, np.float64) * np.asarray(b, np.float64)).tolist())


def unit_rows(m: np.ndarray) -> np.ndarray:
    """Each row of ``m`` (or ``m`` itself, a vector) divided by its L2 norm, the norm summed exactly
    (see :func:`exact_dot`): the same bits whatever BLAS and thread count."""
    m = np.asarray(m, np.float64)
    rows = np.atleast_2d(m)
    norms = np.array([math.sqrt(exact_dot(r, r)) for r in rows])
    return (rows / norms[:, None]).reshape(m.shape)


def uid_of(url: str, text: str) -> str:
    """128-bit hex hash of url + text, the DataComp uid convention."""
    return hashlib.md5(f"{url}\t{text}".encode("utf-8")).hexdigest()


def _original_size(rng: np.random.Generator, bad: bool) -> tuple[int, int]:
    if not bad:
        side = int(np.clip(rng.lognormal(np.log(480), 0.35), 220, 2400))
        aspect = float(rng.uniform(0.67, 1.6))
        w, h = (side, int(side / aspect)) if aspect >= 1 else (int(side * aspect), side)
        return max(w, 200), max(h, 200)
    if rng.random() < 0.5:   # too small
        return int(rng.integers(32, 190)), int(rng.integers(32, 190))
    aspect = float(rng.uniform(3.5, 8.0))   # extreme banner / strip
    long = int(rng.integers(600, 1600))
    return (long, int(long / aspect)) if rng.random() < 0.5 else (int(long / aspect), long)


def _stored_size(w: int, h: int, side: int) -> tuple[int, int]:
    """Downloaded images are resized to fit ``side`` keeping aspect (img2dataset keep_ratio_largest);
    originals already smaller than that are low-resolution and stored at 1/8 of their size."""
    scale = side / max(w, h) if max(w, h) > side else side / 512
    return max(4, round(w * scale)), max(4, round(h * scale))


def make_samples(cfg: PoolParams, seed: int) -> list[Sample]:
    rng = np.random.default_rng([seed, 1])
    n = cfg.num_samples
    fractions = cfg.noise.model_dump()
    counts = {k: int(round(v * n)) for k, v in fractions.items()}
    counts["clean"] = n - sum(counts.values())
    if counts["clean"] < 1:
        raise ValueError("pool.noise fractions leave no clean samples")
    kinds = [k for k in NOISE_KINDS if k not in ("exact_duplicate", "near_duplicate") for _ in range(counts[k])]
    rng.shuffle(kinds)
    c = cfg.concepts
    concepts = world.Concepts(c.zipf, c.off_task, seed) if (c.zipf or c.off_task) else None
    samples: list[Sample] = []
    for i, kind in enumerate(tqdm(kinds, desc="render pool", unit="img", mininterval=2)):
        scene = Scene.random(rng, concepts)
        s = Sample(kind=kind, scene=scene, caption="", caption_scene=scene)
        if kind == "mismatched":
            other = Scene.random(rng, concepts)
            while other.shape == scene.shape and other.colour == scene.colour:
                other = Scene.random(rng, concepts)
            s.caption_scene = other
            s.caption = world.caption_en(other, rng)
        elif kind == "non_english":
            s.caption, s.lang = world.caption_foreign(scene, rng)
        elif kind == "scene_text":
            if _paint_sign(scene, cfg, rng):       # a bare sign; else text over the scene's objects
                scene.size = "small"
            s.caption = world.caption_parrot(scene.text, rng)
            s.caption_scene = None
        elif kind == "uninformative":
            s.caption = world.caption_uninformative(rng)
            s.caption_scene = None
        elif cfg.loose_captions and rng.random() < cfg.loose_captions:   # drawn only when asked: a pool without stays byte-identical
            s.caption = world.caption_loose(scene, rng)
            s.extra["loose"] = True
        else:  # clean, bad_size
            s.caption = world.caption_en(scene, rng)
        s.width, s.height = _original_size(rng, bad=(kind == "bad_size"))
        if kind == "scene_text":      # a sign photographed face on: square, its text whole after a centre crop
            s.width = s.height = min(s.width, s.height)
        sw, sh = _stored_size(s.width, s.height, cfg.image_size)
        s.image = world.jpeg(world.render(scene, rng, sw, sh))
        s.url = world.url(rng, s.caption, i)
        samples.append(s)
    clean_idx = [i for i, s in enumerate(samples) if s.kind == "clean"]
    for kind in ("exact_duplicate", "near_duplicate"):
        for j in range(counts[kind]):
            src = int(rng.choice(clean_idx))
            o = samples[src]
            d = Sample(kind=kind, scene=o.scene, caption=o.caption, lang=o.lang, width=o.width,
                       height=o.height, image=o.image, source=o, caption_scene=o.caption_scene)
            if kind == "near_duplicate":   # re-rendered with jitter, re-encoded, maybe rescaled
                sw, sh = _stored_size(o.width, o.height, cfg.image_size)
                d.image = world.jpeg(world.render(o.scene, rng, sw, sh), quality=int(rng.integers(70, 95)))
            d.url = world.url(rng, d.caption, len(samples) + j + 100000 * (kind == "near_duplicate"))
            samples.append(d)
    order = rng.permutation(len(samples))
    return [samples[i] for i in order]


class ClipSimulator:
    """Stand-in OpenAI CLIP features: concept directions + noise, with an exact target cosine."""

    def __init__(self, dim: int, seed: int, offset: float):
        r = np.random.default_rng([seed, dim])
        unit = lambda k: unit_rows(r.standard_normal((k, dim)))
        self.shape = dict(zip(world.SHAPES, unit(len(world.SHAPES))))
        self.colour = dict(zip(world.COLOURS, unit(len(world.COLOURS))))
        self.count = unit(5)
        self.word = dict(zip(world.SIGN_WORDS, unit(len(world.SIGN_WORDS))))
        self.shape |= dict(zip(world.OFF_TASK_SHAPES, unit(len(world.OFF_TASK_SHAPES))))   # drawn last: the others keep their vectors
        self.dim, self.offset = dim, offset

    def concept(self, scene: Scene | None, rng) -> np.ndarray:
        v = 0.5 * rng.standard_normal(self.dim) / np.sqrt(self.dim)   # per-sample jitter, norm ~0.5
        if scene is None:
            return v
        if scene.count:
            v = v + self.shape[scene.shape] + self.colour[scene.colour] + 0.5 * self.count[scene.count]
        if scene.text:
            v = v + 1.5 * self.word[scene.text]
        return v

    def pair(self, s: Sample, rng) -> tuple[np.ndarray, np.ndarray]:
        mean, sd = B32_SCORE["loose" if _loose(s) else s.kind]
        target = float(np.clip(rng.normal(mean - self.offset, sd), -0.2, 0.6))
        txt_scene = s.caption_scene
        if s.kind == "scene_text":
            txt_scene = Scene("circle", "red", 0, "small", "white", text=s.scene.text)
        t = unit_rows(self.concept(txt_scene, rng))
        base = self.concept(s.scene, rng)
        u = unit_rows(base - exact_dot(base, t) * t)
        img = target * t + np.sqrt(1 - target**2) * u
        return img.astype(np.float16), t.astype(np.float16)


def write_pool(cfg: PoolParams, seed: int, out: str) -> dict:
    """Generate the demo pool into ``out`` (replaced atomically). Returns a summary."""
    samples = make_samples(cfg, seed)
    rng = np.random.default_rng([seed, 2])
    sims = {"b32": ClipSimulator(512, seed, 0.0), "l14": ClipSimulator(768, seed, 0.035)}
    emb = {f"{f}_{m}": [] for f in sims for m in ("img", "txt")}
    for s in samples:
        if s.kind != "exact_duplicate":
            for fam, sim in sims.items():
                s.extra[fam] = sim.pair(s if s.kind in B32_SCORE else _as_clean(s), rng)
    for s in samples:   # exact duplicates share the original's features
        if s.kind == "exact_duplicate":
            s.extra = dict(s.source.extra)
    with atomic_dir(out) as tmp:
        root = str(tmp)
        truth = []
        for n, lo in enumerate(range(0, len(samples), cfg.shard_size)):
            chunk = samples[lo: lo + cfg.shard_size]
            stem = shards.stem(n)
            rows, tar, arrays = [], [], {k: [] for k in emb}
            for k, s in enumerate(chunk):
                uid = uid_of(s.url, s.caption)
                key = f"{stem}{k:04d}"
                vec = {f"{f}_{m}": s.extra[f][j] for f in sims for j, m in enumerate(("img", "txt"))}
                for name, v in vec.items():
                    arrays[name].append(v)
                score = {f: exact_dot(vec[f"{f}_img"], vec[f"{f}_txt"]) for f in sims}
                faces = []
                if rng.random() < 0.05:   # a face box, normalised x0, y0, x1, y1
                    x0, y0 = rng.uniform(0, 0.6, 2)
                    faces = [[float(x0), float(y0), float(x0 + 0.2), float(y0 + 0.25)]]
                rows.append({"uid": uid, "url": s.url, "text": s.caption, "original_width": s.width,
                             "original_height": s.height, "clip_b32_similarity_score": score["b32"],
                             "clip_l14_similarity_score": score["l14"], "face_bboxes": faces,
                             "sha256": hashlib.sha256(s.image).hexdigest()})
                tar.append({"__key__": key, "jpg": s.image, "txt": s.caption,
                            "json": {"uid": uid, "url": s.url, "caption": s.caption, "key": key,
                                     "original_width": s.width, "original_height": s.height,
                                     "status": "success"}})
                sc = s.scene
                truth.append({"uid": uid, "kind": s.kind, "lang": s.lang, "shape": sc.shape if sc.count else None,
                              "colour": sc.colour if sc.count else None, "count": sc.count,
                              "background": sc.background, "scene_text": sc.text,
                              "on_task": bool(sc.count) and sc.shape in world.SHAPES,
                              "duplicate_of": uid_of(s.source.url, s.source.caption) if s.source else None}
                             | ({"loose_caption": _loose(s)} if cfg.loose_captions else {}))
            shards.write_meta(root, stem, pa.Table.from_pylist(rows, schema=shards.META_SCHEMA))
            shards.write_npz(root, stem, {k: np.stack(v) for k, v in arrays.items()})
            shards.write_tar(root, stem, tar)
        import pandas as pd

        pd.DataFrame(truth).to_parquet(tmp / "truth.parquet", index=False)
        trusted = write_trusted(cfg, seed, str(tmp / "trusted"))
        summary = {"source": "demo", "uri": ".", "num_samples": len(samples),
                   "num_shards": n + 1, "kinds": {k: sum(s.kind == k for s in samples) for k in NOISE_KINDS},
                   "trusted_samples": trusted, "seed": seed, "embedding_keys": sorted(emb)}
        write_json(tmp / "manifest.json", summary)
    return summary


def _loose(s: Sample) -> bool:
    """Whether a sample's caption is loose alt text (a duplicate's is its source's)."""
    return bool((s.source or s).extra.get("loose"))


def _paint_sign(scene: Scene, cfg: PoolParams, rng: np.random.Generator) -> bool:
    """Paint a sign word on ``scene``: over its objects (a poster, a product shot, a meme: most
    text on the web's images sits on something) for a share ``text_on_objects``, else on a bare
    sign (no objects). Returns whether the sign is bare. The share is drawn only when set, so a
    world without it stays byte-identical."""
    scene.text = world.sign_text(rng)
    if cfg.text_on_objects and rng.random() < cfg.text_on_objects:
        return False
    scene.count = 0
    return True


def _as_clean(s: Sample) -> Sample:
    return Sample(kind="clean", scene=s.scene, caption=s.caption, caption_scene=s.caption_scene,
                  extra={"loose": True} if _loose(s) else {})


def write_trusted(cfg: PoolParams, seed: int, out: str) -> int:
    """Clean, well-captioned pairs for the scorer, a share ``trusted_signs`` of them signs whose
    caption names their text: web-trained CLIP learns to read from such pairs, and so rewards a
    caption that only repeats an image's text (the flipped-image score's target)."""
    rng = np.random.default_rng([seed, 3])
    samples = []
    for i in tqdm(range(cfg.trusted_samples), desc="render trusted", unit="img", mininterval=2):
        scene = Scene.random(rng)
        if rng.random() < cfg.trusted_signs:
            _paint_sign(scene, cfg, rng)
            caption = str(rng.choice(["a sign that says {w}", "the word {w}", "{w} sign", "{w}"])).format(w=scene.text)
        else:
            caption = world.caption_en(scene, rng)
        img = world.jpeg(world.render(scene, rng, cfg.image_size, cfg.image_size))
        u = world.url(rng, caption, i)
        samples.append({"__key__": f"t{i:07d}", "jpg": img, "txt": caption,
                        "json": {"uid": uid_of(u, caption), "url": u, "caption": caption}})
    for n, lo in enumerate(range(0, len(samples), cfg.shard_size)):
        shards.write_tar(out, shards.stem(n), samples[lo: lo + cfg.shard_size])
    return len(samples)


def heldout_pairs(cfg: PoolParams, seed: int, n: int = 400) -> list[tuple]:
    """Fresh (image, caption, kind) pairs from the demo world, for measuring a scorer:
    ``matched``, ``mismatched`` (another scene's caption) and ``scene_text`` (caption = sign text)."""
    rng = np.random.default_rng([seed, 11])
    out = []
    for i in range(n):
        scene = Scene.random(rng)
        img = world.render(scene, rng, cfg.image_size, cfg.image_size)
        out.append((img, world.caption_en(scene, rng), "matched"))
        other = Scene.random(rng)
        while other.shape == scene.shape and other.colour == scene.colour:
            other = Scene.random(rng)
        out.append((img, world.caption_en(other, rng), "mismatched"))
        if i % 4 == 0:
            sign = Scene.random(rng)
            _paint_sign(sign, cfg, rng)
            out.append((world.render(sign, rng, cfg.image_size, cfg.image_size), sign.text, "scene_text"))
    return out
