"""Per-shard image, flipped-image and text embeddings from the scoring CLIP, as a streaming job.

For each pool shard writes ``<out>/{n:08d}.npz`` (row i <-> parquet row i):
``<name>_img``, ``<name>_img_flip``, ``<name>_txt`` (L2-normalised, float16), and
``<out>/{n:08d}.parquet`` with ``uid``, ``<name>_score`` (cosine of image and text),
``<name>_flip_score`` (the same on the horizontally flipped image) and ``image_ok``.
An image that does not decode, a uid with no image, or the images after the cut of a truncated tar
are quarantined: NaN embeddings, ``image_ok = False``, counted in the summary — never a crash,
never silently dropped; the stage's gate decides by threshold (share of rows with an image).

Streaming: shards are read, decoded, preprocessed (original and mirrored) and tokenised in
DataLoader worker processes while the model encodes the previous batch; on a GPU, batches are pinned
and copied asynchronously, the model runs in bf16 autocast, channels-last, optionally
``torch.compile``d. Resumable: the shards are the units of a job (winnow.jobs) whose work directory
the caller keys; a shard's outputs are written there and its completion marker last, so a re-run
skips finished shards and redoes a partial one. Several devices split the shard list, one process
per device.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import ImageOps
from tqdm import tqdm

from winnow.io import atomic_file, local
from winnow.jobs import WorkDir
from winnow.pool import shards
from winnow.pool.view import Pool

ENCODINGS = ("img", "flip", "txt")   # image, horizontally mirrored image, caption


def _encode(model, fn, batches) -> np.ndarray:
    outs = []
    with torch.no_grad():
        for b in batches:
            f = fn(b)
            outs.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


class ShardStream(torch.utils.data.IterableDataset):
    """Items per shard, produced in worker processes (each worker takes every n-th shard):
    ``("start", shard, info)`` with uids, tokens and quarantine counts, then per batch either
    ``("images", shard, rows, x, x_flipped)`` (decoded and preprocessed here, ``decode="pil"``) or
    ``("jpegs", shard, rows, [uint8 tensors])`` (encoded bytes for tensor decode on the model's
    device, ``decode="tensor"``), then ``("end", shard, None)``."""

    def __init__(self, pool: Pool, shard_list: list[str], preprocess, tokenizer, batch_size: int,
                 decode: str = "pil", encode: frozenset = frozenset(ENCODINGS)):
        self.pool, self.shards = pool, shard_list
        self.preprocess, self.tokenizer, self.batch_size, self.decode = preprocess, tokenizer, batch_size, decode
        self.encode = encode

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.shards if info is None else self.shards[info.id::info.num_workers]
        for shard in mine:
            yield from self._shard(shard)

    def _samples(self, shard: str):
        """The image samples of a pool shard: its own tar, or (download layout) the img2dataset
        shards that hold its samples, which may hold other files' samples too."""
        for image_shard in self.pool.image_shards(shard):
            yield from shards.iter_tar(self.pool.images_uri, image_shard)

    def _shard(self, shard: str):
        meta = shards.read_meta(self.pool.uri, shard, columns=["uid", "text"])
        uids = meta["uid"].to_pylist()
        texts = [t if isinstance(t, str) else "" for t in meta["text"].to_pylist()]
        row_of = {u: i for i, u in enumerate(uids)}
        images: dict[int, object] = {}
        corrupt, unknown, tar_error = [], [], ""
        pixels = bool(self.encode & {"img", "flip"})
        try:
            for s in (self._samples(shard) if pixels else ()):
                i = row_of.get(s["json"].get("uid"))
                if i is None:
                    if not self.pool.is_download:   # a download's image shard may hold other files' samples
                        unknown.append(s["__key__"])
                    continue
                if self.decode == "tensor":     # decoded later on the model's device; empty bytes are corrupt here
                    if s["jpg"]:
                        images[i] = torch.frombuffer(bytearray(s["jpg"]), dtype=torch.uint8)
                    else:
                        corrupt.append(uids[i])
                    continue
                try:
                    images[i] = shards.decode_image(s["jpg"] or b"")
                except ValueError:
                    corrupt.append(uids[i])
        except shards.ShardError as exc:   # a truncated tar: the images after the cut are missing, counted
            tar_error = str(exc)
        tokens = self.tokenizer(texts) if texts and "txt" in self.encode else None
        yield ("start", shard, {"uids": uids, "tokens": tokens,
                                "corrupt": corrupt, "unknown": len(unknown), "tar_error": tar_error})
        rows = sorted(images)
        for k in range(0, len(rows), self.batch_size):
            chunk = rows[k: k + self.batch_size]
            if self.decode == "tensor":
                yield ("jpegs", shard, torch.tensor(chunk), [images[r] for r in chunk])
                continue
            x = torch.stack([self.preprocess(images[r]) for r in chunk])
            xf = torch.stack([self.preprocess(ImageOps.mirror(images[r])) for r in chunk]) if "flip" in self.encode else None
            yield ("images", shard, torch.tensor(chunk), x, xf)
        yield ("end", shard, None)


class Encoder:
    """The model's encoders on one device: bf16 autocast, channels-last and optional torch.compile
    on CUDA; plain fp32 on CPU."""

    def __init__(self, model, device: str = "cpu", compile: bool = False):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.model = model.to(self.device).eval()
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.image_fn = torch.compile(self.model.encode_image) if compile else self.model.encode_image
        self.text_fn = self.model.encode_text

    def dim(self) -> int:
        """The embedding width (the text tower's output, which the image tower's matches)."""
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, torch.Tensor):
            return int(proj.shape[-1])
        return int(getattr(proj, "out_features", None) or self.model.visual.output_dim)

    def _ctx(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

    @torch.no_grad()
    def images(self, x: torch.Tensor) -> np.ndarray:
        x = x.to(self.device, non_blocking=True)
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._ctx():
            f = self.image_fn(x)
        return torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy()

    @torch.no_grad()
    def texts(self, tokens: torch.Tensor, batch_size: int) -> np.ndarray:
        outs = []
        for k in range(0, len(tokens), batch_size):
            with self._ctx():
                f = self.text_fn(tokens[k: k + batch_size].to(self.device, non_blocking=True))
            outs.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy())
        return np.concatenate(outs)


def _finish_shard(state: dict, enc: Encoder, work: WorkDir, shard: str, name: str, batch_size: int,
                  encode: frozenset = frozenset(ENCODINGS)) -> dict:
    info = state["info"]
    uids = info["uids"]
    n = len(uids)
    dim = enc.dim()
    txt = enc.texts(info["tokens"], batch_size) if n and "txt" in encode else np.full((n, dim), np.nan, np.float32)
    img = np.full((n, dim), np.nan, np.float32)
    flip = img.copy()
    ok = np.zeros(n, bool)
    for rows, a, b in state["parts"]:
        img[rows] = a
        if b is not None:
            flip[rows] = b
        ok[rows] = True
    info["corrupt"] = info["corrupt"] + state["corrupt"]
    arrays = {"img": (f"{name}_img", img), "flip": (f"{name}_img_flip", flip), "txt": (f"{name}_txt", txt)}
    out = work.path
    shards.write_npz(str(out), shard, {k: v for e, (k, v) in arrays.items() if e in encode})
    cols = {"uid": uids}
    if {"img", "txt"} <= encode:
        cols[f"{name}_score"] = np.einsum("nd,nd->n", img, txt).astype(np.float32)
    if {"flip", "txt"} <= encode:
        cols[f"{name}_flip_score"] = np.einsum("nd,nd->n", flip, txt).astype(np.float32)
    table = pa.table(cols | {"image_ok": ok})
    with atomic_file(shards.path(str(out), shard, "parquet")) as tmp:
        pq.write_table(table, tmp)
    stats = {"shard": shard, "rows": n, "embedded": int(ok.sum()), "corrupt_images": len(info["corrupt"]),
             "missing_images": int(n - ok.sum() - len(info["corrupt"])), "unknown_tar_members": info["unknown"],
             "tar_error": info["tar_error"], "corrupt_uids": info["corrupt"][:5]}
    work.mark(shard, stats)     # last: the shard is complete
    return stats


def embed_shards(pool: Pool, shard_list: list[str], model, preprocess, tokenizer, work: WorkDir,
                 name: str = "scorer", batch_size: int = 256, workers: int = 1, device: str = "cpu",
                 compile: bool = False, decode: str = "pil", progress: str = "embed shards",
                 encode=ENCODINGS) -> list[dict]:
    """Embed ``shard_list`` into the work directory, skipping shards already marked done there. ``decode``:
    ``pil`` in the DataLoader workers, or ``tensor`` on the model's device (nvjpeg on CUDA).
    ``encode``: which of the image, mirrored image and text encodings to compute (what the recipe
    needs that the pool lacks)."""
    encode = frozenset(encode)
    bad = encode - set(ENCODINGS)
    if bad or not encode:
        raise ValueError(f"encode must be a non-empty subset of {ENCODINGS}, not {sorted(encode)}")
    from winnow.decode import TensorPreprocess

    done = {s: stats for s in shard_list if (stats := work.done(s)) is not None}
    todo = [s for s in shard_list if s not in done]
    enc = Encoder(model, device, compile)
    tensor_pre = TensorPreprocess(model.visual.preprocess_cfg, device) if decode == "tensor" else None
    stream = ShardStream(pool, todo, preprocess, tokenizer, batch_size, decode, encode)
    n_workers = min(workers, len(todo))
    # spawned, not forked: a worker must not inherit the parent's threads, locks and exit handlers
    # (Prefect, MLflow, Dask clients), which made forked workers fail on exit after a long session
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=n_workers,
                                         pin_memory=enc.cuda, prefetch_factor=4 if n_workers else None,
                                         multiprocessing_context="spawn" if n_workers else None,
                                         persistent_workers=False)
    states: dict[str, dict] = {}
    bar = tqdm(total=len(shard_list), initial=len(shard_list) - len(todo), desc=progress, unit="shard")
    for kind, shard, *rest in (loader if todo else []):
        if kind == "start":
            states[shard] = {"info": rest[0], "parts": [], "corrupt": []}
        elif kind in ("images", "jpegs"):
            if kind == "jpegs":
                rows, jpegs = rest
                decoded, bad = tensor_pre.decode(jpegs)
                states[shard]["corrupt"] += [states[shard]["info"]["uids"][int(rows[i])] for i in bad]
                keep = [i for i in range(len(rows)) if i not in bad]
                if not keep:
                    continue
                rows = rows[keep]
                x = torch.stack([tensor_pre(decoded[i]) for i in keep])
                xf = torch.flip(x, dims=[-1]) if "flip" in encode else None   # mirroring commutes with the centred crop
            else:
                rows, x, xf = rest
            f = enc.images(torch.cat([x, xf]) if xf is not None else x)   # original and mirrored in one pass
            states[shard]["parts"].append((rows.numpy(), f[: len(rows)], f[len(rows):] if xf is not None else None))
        else:
            done[shard] = _finish_shard(states.pop(shard), enc, work, shard, name, batch_size, encode)
            bar.update(1)
    bar.close()
    return [done[s] for s in shard_list]


def _device_worker(rank: int, devices: list[str], pool: Pool, model_spec: dict, work: WorkDir, kw: dict) -> None:
    """One device's share of the shards, in its own process."""
    from winnow import models

    model, pre, tok = models.load(model_spec["model"], model_spec.get("weights"))
    embed_shards(pool, pool.shards[rank::len(devices)], model, pre, tok, work, device=devices[rank],
                 progress=f"embed on {devices[rank]} (rank {rank})", **kw)


def embed_pool(pool: Pool, model_spec: dict, work: WorkDir, name: str = "scorer", batch_size: int = 256,
               workers: int = 1, devices: list[str] | None = None, compile: bool = False,
               decode: str = "pil", encode=ENCODINGS) -> list[dict]:
    """Embed every shard of the pool with the model ``{"model": arch, "weights": tag|path|None}``.
    One device: in this process. Several: one spawned process per device, each taking every n-th
    shard (the outputs are per shard, so they do not depend on the split)."""
    from winnow import models

    devices = devices or ["cpu"]
    kw = {"name": name, "batch_size": batch_size, "workers": workers, "compile": compile, "decode": decode,
          "encode": tuple(sorted(encode))}
    if len(devices) == 1:
        model, pre, tok = models.load(model_spec["model"], model_spec.get("weights"))
        return embed_shards(pool, pool.shards, model, pre, tok, work, device=devices[0], **kw)
    torch.multiprocessing.spawn(_device_worker, args=(devices, pool, model_spec, work, kw), nprocs=len(devices))
    done = work.finished()
    missing = [s for s in pool.shards if s not in done]
    if missing:
        raise RuntimeError(f"embed: shards not finished by the device processes: {missing[:5]}")
    return [done[s] for s in pool.shards]


def embed_targets(suite, data_root: str, model, preprocess, tokenizer, out: str, batch_size: int = 256,
                  workers: int = 0) -> dict:
    """Embeddings of downstream-task data usable for distribution alignment (DataComp allows task
    *training* data, class names and templates, never test images): ``img:<task>`` for each task's
    train split images, ``txt:<task>`` for class names x templates (mean per class) or the train
    split's captions. Written to ``<out>/targets.npz``. The train split streams in batches
    (``winnow.tasks.iter_split``, decoded in ``workers`` DataLoader processes through the member
    allowlist): only embeddings are held, never the images, whatever the split's size."""
    from winnow.tasks import MissingTask, iter_split, read_zeroshot_text, task_data

    arrays, counts = {}, {}
    for task in suite.tasks:
        img_parts, captions = [], []
        if task.type != "association":
            try:
                for b in iter_split(task, data_root, "train", transform=preprocess, batch_size=batch_size,
                                    workers=workers, layout=suite.layout, kind="images"):
                    if b.keys:
                        img_parts.append(_encode(model, model.encode_image, [b.images]))
                    captions += [c for caps in (b.captions or []) for c in (caps or []) if c]
            except MissingTask:
                pass    # no train split (DataComp's evaluation sets are test-only): class prompts only
        if img_parts:
            arrays[f"img:{task.key}"] = np.concatenate(img_parts)
        prompts: list[list[str]] = []
        data = task_data(task, data_root, suite.layout)
        if data.kind == "wds" and (data.path / "classnames.txt").exists():
            names, templates = read_zeroshot_text(data.path)
            prompts = [[t.format(c=c) for t in templates] for c in names]
        elif captions:
            prompts = [[c] for c in captions]
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
