"""Per-shard image, flipped-image and text embeddings from the scoring CLIP.

For each pool shard writes ``<out>/{n:08d}.npz`` (row i <-> parquet row i):
``<name>_img``, ``<name>_img_flip``, ``<name>_txt`` (L2-normalised, float16), and
``<out>/{n:08d}.parquet`` with ``uid``, ``<name>_score`` (cosine of image and text),
``<name>_flip_score`` (the same on the horizontally flipped image) and ``image_ok``.
An image that does not decode, or a uid with no image, is quarantined: NaN embeddings,
``image_ok = False``, counted in the summary — never a crash, never silently dropped.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from PIL import ImageOps
from tqdm import tqdm

from winnow.io import atomic_file
from winnow.pool import shards
from winnow.pool.view import Pool


def _encode(model, fn, batches) -> np.ndarray:
    outs = []
    with torch.no_grad():
        for b in batches:
            f = fn(b)
            outs.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def embed_shard(pool: Pool, shard: str, model, preprocess, tokenizer, out: str, name: str,
                batch_size: int) -> dict:
    meta = shards.read_meta(pool.uri, shard, columns=["uid", "text"])
    uids = meta["uid"].to_pylist()
    texts = meta["text"].to_pylist()
    row_of = {u: i for i, u in enumerate(uids)}
    images: dict[int, object] = {}
    corrupt, unknown = [], []
    for s in shards.iter_tar(pool.uri, shard):
        uid = s["json"].get("uid")
        i = row_of.get(uid)
        if i is None:
            unknown.append(s["__key__"])
            continue
        try:
            images[i] = shards.decode_image(s["jpg"] or b"")
        except ValueError:
            corrupt.append(uid)
    n = len(uids)
    ok = np.zeros(n, bool)
    ok[list(images)] = True
    rows = sorted(images)
    tchunks = [texts[i: i + batch_size] for i in range(0, n, batch_size)]
    txt = _encode(model, model.encode_text, (tokenizer(c) for c in tchunks))
    img = np.full_like(txt, np.nan)
    flip = img.copy()
    chunks = [rows[i: i + batch_size] for i in range(0, len(rows), batch_size)]
    if rows:
        img[rows] = _encode(model, model.encode_image,
                            (torch.stack([preprocess(images[r]) for r in c]) for c in chunks))
        flip[rows] = _encode(model, model.encode_image,
                             (torch.stack([preprocess(ImageOps.mirror(images[r])) for r in c]) for c in chunks))
    score = np.einsum("nd,nd->n", img, txt)
    flip_score = np.einsum("nd,nd->n", flip, txt)
    shards.write_npz(out, shard, {f"{name}_img": img, f"{name}_img_flip": flip, f"{name}_txt": txt})
    table = pa.table({"uid": uids, f"{name}_score": score.astype(np.float32),
                      f"{name}_flip_score": flip_score.astype(np.float32), "image_ok": ok})
    import pyarrow.parquet as pq

    with atomic_file(shards.path(out, shard, "parquet")) as tmp:
        pq.write_table(table, tmp)
    return {"shard": shard, "rows": n, "embedded": int(ok.sum()), "corrupt_images": len(corrupt),
            "missing_images": int(n - ok.sum() - len(corrupt)), "unknown_tar_members": len(unknown),
            "corrupt_uids": corrupt[:5]}


def embed_pool(pool: Pool, model, preprocess, tokenizer, out: str, name: str = "scorer",
               batch_size: int = 256) -> list[dict]:
    return [embed_shard(pool, s, model, preprocess, tokenizer, out, name, batch_size)
            for s in tqdm(pool.shards, desc="embed shards", unit="shard")]


def embed_targets(suite, data_root: str, model, preprocess, tokenizer, out: str, batch_size: int = 256) -> dict:
    """Embeddings of downstream-task data usable for distribution alignment (DataComp allows task
    *training* data, class names and templates, never test images): ``img:<task>`` for each task's
    train split images, ``txt:<task>`` for class names x templates (mean per class) or the train
    split's captions. Written to ``<out>/targets.npz``."""
    from winnow.evaluate import MissingTask, _load, read_zeroshot_text
    from winnow.io import local

    arrays, counts = {}, {}
    for task in suite.tasks:
        task_dir = local(data_root) / task.key
        label = "cls" if task.type == "zeroshot_classification" else "txt"
        try:
            items = list(_load(task_dir, label, split="train"))
        except MissingTask:
            items = []
        if items:
            imgs = [im for im, _ in items]
            arrays[f"img:{task.key}"] = _encode(model, model.encode_image, (
                torch.stack([preprocess(im) for im in imgs[i: i + batch_size]]) for i in range(0, len(imgs), batch_size)))
        prompts: list[list[str]] = []
        if (task_dir / "classnames.txt").exists():
            names, templates = read_zeroshot_text(task_dir)
            prompts = [[t.format(c=c) for t in templates] for c in names]
        elif items:
            prompts = [[c] for _, txt in items for c in (txt if isinstance(txt, str) else txt.decode()).split("\n") if c]
        if prompts:
            flat = [p for group in prompts for p in group]
            e = _encode(model, model.encode_text, (tokenizer(flat[i: i + batch_size]) for i in range(0, len(flat), batch_size)))
            bounds = np.cumsum([0] + [len(g) for g in prompts])
            means = np.stack([e[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:])])
            arrays[f"txt:{task.key}"] = means / np.linalg.norm(means, axis=1, keepdims=True)
        counts[task.key] = {k.split(":")[0]: len(v) for k, v in arrays.items() if k.endswith(f":{task.key}")}
    with atomic_file(local(out) / "targets.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **{k: v.astype(np.float16) for k, v in arrays.items()})
    return counts
