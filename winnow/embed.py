"""Per-shard image, flipped-image and text embeddings from the scoring CLIP, as a streaming job.

For each pool shard writes ``<out>/{n:08d}.npz`` (row i <-> parquet row i):
``<name>_img``, ``<name>_img_flip``, ``<name>_txt`` (L2-normalised, float16), and
``<out>/{n:08d}.parquet`` with ``uid``, ``<name>_score`` (cosine of image and text),
``<name>_flip_score`` (the same on the horizontally flipped image) and ``image_ok``.
An image that does not decode, a uid with no image, or the images after the cut of a truncated tar
are quarantined: NaN embeddings, ``image_ok = False``, counted in the summary — never a crash,
never silently dropped; the stage's gate decides by threshold (share of rows with an image).

Streaming: shards are read, decoded, preprocessed (original and mirrored) and tokenised in
DataLoader worker processes while the model encodes the previous batch; a shard's images are
decoded and batched as its tar is read, in row order whatever the tar's order (``ShardStream``), so
a worker holds about one batch of decoded images, not a shard's; on a GPU, batches are pinned
and copied asynchronously, the model runs in bf16 autocast, channels-last, optionally
``torch.compile``d. Resumable: the shards are the units of a job (winnow.jobs) whose work directory
the caller keys; a shard's outputs are written there and its completion marker last, so a re-run
skips finished shards and redoes a partial one. Several devices split the shard list, one process
per device.
"""
from __future__ import annotations

import contextlib
import heapq
import itertools
import math

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


class _InOrder:
    """The expectation for a pool's own tar (the demo's, ``pool.shards.write_tar``'s): samples in row
    order, so a row is settled once a later row has arrived (a row not seen by then has no image)."""

    def __init__(self):
        self.last = -1

    def seen(self, row: int) -> None:
        self.last = max(self.last, row)

    def settled(self) -> int:
        return self.last


class _Recorded:
    """The expectation for a download's image shards: img2dataset records every sample it wrote
    (status ``success``), in completion order, not row order; a row is settled once its recorded
    samples have arrived, so the rows below the smallest still awaited are."""

    def __init__(self, counts: dict[int, int]):
        self.left = dict(counts)
        self.heap = sorted(counts)

    def seen(self, row: int) -> None:
        if self.left.get(row, 0) > 0:
            self.left[row] -= 1
        while self.heap and self.left[self.heap[0]] == 0:
            heapq.heappop(self.heap)

    def settled(self) -> int:
        return self.heap[0] if self.heap else math.inf


class _AtEnd:
    """No expectation: nothing is settled before the tar has been read (every sample is held, encoded)."""

    def seen(self, row: int) -> None:
        pass

    def settled(self) -> int:
        return -1


class _OutOfOrder(Exception):
    """A sample gave a row an image after that row's batch had been formed."""


class ShardStream(torch.utils.data.IterableDataset):
    """Items per shard, produced in worker processes (each worker takes every n-th shard):
    ``("start", shard, info)`` with the uids and tokens, then per batch either
    ``("images", shard, rows, x, x_flipped)`` (decoded and preprocessed here, ``decode="pil"``) or
    ``("jpegs", shard, rows, [uint8 tensors])`` (encoded bytes for tensor decode on the model's
    device, ``decode="tensor"``), then ``("end", shard, tail)`` with what is known only once the tar
    has been read: ``corrupt`` (uids, in tar order), ``unknown`` (samples of no uid of the shard)
    and ``tar_error``. A ``("restart", shard, None)`` item voids the shard's batches so far (the
    tar's order broke the expectation below; the shard follows again, whole).

    Batches are formed as the tar is read, so a worker holds about one batch of decoded images: the
    samples are kept encoded until their row is *settled* (no later sample can change which rows
    before it have an image), then decoded in row order into batches of ``batch_size``. The
    batches are therefore the shard's rows with an image, in row order, cut every ``batch_size``
    (what the model sees does not depend on the tar's order). A row is settled by the
    expectation of the layout: a pool's own tar is in row order (:class:`_InOrder`); a download's
    image shards are in img2dataset's completion order, and its records say which samples each
    holds (:class:`_Recorded`). A sample that contradicts the expectation after its row was batched
    (a duplicate uid further on, a row out of order) restarts the shard, holding every sample until
    the end (:class:`_AtEnd`); several samples of one uid give the row the last one that decodes."""

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

    def _expectation(self, shard: str, row_of: dict):
        if not self.pool.is_download:
            return _InOrder()
        from winnow.pool import datacomp

        counts: dict[int, int] = {}
        try:
            for image_shard in self.pool.image_shards(shard):
                rec = datacomp.read_records(self.pool.images_uri, image_shard)
                for u, status in zip(rec["uid"].to_pylist(), rec["status"].to_pylist()):
                    i = row_of.get(u) if isinstance(u, str) else None
                    if i is not None and status == datacomp.SUCCESS:
                        counts[i] = counts.get(i, 0) + 1
        except shards.ShardError:   # no records: the tar is read first, then batched
            return _AtEnd()
        return _Recorded(counts)

    def _shard(self, shard: str):
        meta = shards.read_meta(self.pool.uri, shard, columns=["uid", "text"])
        uids = meta["uid"].to_pylist()
        texts = [t if isinstance(t, str) else "" for t in meta["text"].to_pylist()]
        row_of = {u: i for i, u in enumerate(uids)}
        tokens = self.tokenizer(texts) if texts and "txt" in self.encode else None
        yield ("start", shard, {"uids": uids, "tokens": tokens})
        if not self.encode & {"img", "flip"}:
            yield ("end", shard, {"corrupt": [], "unknown": 0, "tar_error": ""})
            return
        try:
            tail = yield from self._batches(shard, uids, row_of, self._expectation(shard, row_of))
        except _OutOfOrder:
            tail = None     # out of the handler: its traceback would keep the first pass's images
        if tail is None:
            yield ("restart", shard, None)
            tail = yield from self._batches(shard, uids, row_of, _AtEnd())
        yield ("end", shard, tail)

    def _load(self, data: bytes | None):
        """A sample's image as the batch carries it, or None where it is corrupt (empty bytes are,
        for tensor decode; the rest of its checks run on the model's device)."""
        if self.decode == "tensor":
            return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else None
        try:
            return shards.decode_image(data or b"")
        except ValueError:
            return None

    def _batch(self, shard: str, chunk: list):
        rows = torch.tensor([r for r, _ in chunk])
        if self.decode == "tensor":
            return ("jpegs", shard, rows, [img for _, img in chunk])
        x = torch.stack([self.preprocess(img) for _, img in chunk])
        xf = torch.stack([self.preprocess(ImageOps.mirror(img)) for _, img in chunk]) if "flip" in self.encode else None
        return ("images", shard, rows, x, xf)

    def _batches(self, shard: str, uids: list, row_of: dict, expect):
        """Read the shard's samples, yielding its batches as their rows settle; returns the tail."""
        held: dict[int, list] = {}      # row -> [(sample number, encoded image)], until the row settles
        queue: list[int] = []           # the held rows, a heap
        chunk: list = []                # (row, decoded image) of the batch being formed
        corrupt: list = []              # (sample number, uid)
        unknown, tar_error, batched = 0, "", -1   # batched: the last row that went into a batch

        def settle(below):
            nonlocal batched
            while queue and queue[0] < below:
                row = heapq.heappop(queue)
                img = None
                for k, data in held.pop(row):
                    got = self._load(data)
                    if got is None:
                        corrupt.append((k, uids[row]))
                    else:
                        img = got       # a later sample of the uid wins, as it always did
                batched = row
                if img is not None:
                    chunk.append((row, img))
                    if len(chunk) == self.batch_size:
                        yield self._batch(shard, chunk)
                        chunk.clear()

        samples = self._samples(shard)
        try:
            for k in itertools.count():
                try:
                    s = next(samples)
                except StopIteration:
                    break
                except shards.ShardError as exc:   # a truncated tar: the images after the cut are missing, counted
                    tar_error = str(exc)
                    break
                i = row_of.get(s["json"].get("uid"))
                if i is None:
                    if not self.pool.is_download:   # a download's image shard may hold other files' samples
                        unknown += 1
                    continue
                data = s["jpg"]
                if i <= batched:        # the row's batch is formed: only a corrupt image changes nothing
                    if self._load(data) is not None:
                        raise _OutOfOrder(shard)
                    corrupt.append((k, uids[i]))
                    continue
                if i not in held:
                    held[i] = []
                    heapq.heappush(queue, i)
                held[i].append((k, data))
                expect.seen(i)
                yield from settle(expect.settled())
        finally:
            samples.close()
        yield from settle(math.inf)
        if chunk:
            yield self._batch(shard, chunk)
        return {"corrupt": [u for _, u in sorted(corrupt)], "unknown": unknown, "tar_error": tar_error}


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
        elif kind == "restart":     # the shard's batches so far are void: it comes again, whole
            states[shard].update(parts=[], corrupt=[])
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
        else:   # "end": the tail (corrupt uids, unknown members, tar error) is known once the tar is read
            state = states.pop(shard)
            state["info"].update(rest[0])
            done[shard] = _finish_shard(state, enc, work, shard, name, batch_size, encode)
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
