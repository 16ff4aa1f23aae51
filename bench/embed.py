"""Embedding throughput end to end from tar shards, against the model-only forward, in one run.

    python bench/embed.py                                   # CPU: ViT-B-32 and ViT-L-14, random weights
    python bench/embed.py --device cuda --compile --images 20000 --batch 512 --workers 8

"end to end" is the embed stage's own path (``winnow.embed.embed_shards``): parquet + tar read,
JPEG decode, preprocessing of the image and its mirror and tokenisation in DataLoader workers,
the image tower on both, the text tower, scores, npz/parquet writes. "model only" is the same
model's forward on already-preprocessed tensors of the same batch shape (image + mirror, then the
captions), repeated for the same number of images. Both count images per second (each image is
encoded twice, as the flipped-image score needs). ``--decode both`` also measures decoding on the
model's device (nvjpeg on CUDA) against PIL in the workers. Results in ``reports/bench/embed.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def generate(out: Path, images: int, per_shard: int, side: int, seed: int = 0) -> None:
    """A DataComp-layout pool of random-texture JPEGs (parquet + tar per shard)."""
    import io

    import pyarrow as pa
    import webdataset as wds
    from PIL import Image

    from winnow.io import write_json
    from winnow.pool import shards

    spec = {"images": images, "per_shard": per_shard, "side": side, "seed": seed}
    if (out / "manifest.json").exists() and json.loads((out / "manifest.json").read_text()).get("bench") == spec:
        return
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for n in range((images + per_shard - 1) // per_shard):
        k = min(per_shard, images - n * per_shard)
        uids = [r.tobytes().hex() for r in rng.integers(0, 256, (k, 16), dtype=np.uint8)]
        texts = [f"a photo of texture number {i} in the bench pool" for i in range(k)]
        stem = shards.stem(n)
        with wds.TarWriter(str(out / f"{stem}.tar")) as w:
            for u, t in zip(uids, texts):
                small = rng.integers(0, 255, (side // 8, side // 8, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(small).resize((side, side), Image.BILINEAR).save(buf, "JPEG", quality=90)
                w.write({"__key__": u, "jpg": buf.getvalue(), "txt": t, "json": {"uid": u}})
        table = pa.table({"uid": uids, "url": [f"https://example.com/{u}.jpg" for u in uids], "text": texts,
                          "original_width": [side] * k, "original_height": [side] * k,
                          "clip_b32_similarity_score": np.zeros(k, np.float32),
                          "clip_l14_similarity_score": np.zeros(k, np.float32),
                          "face_bboxes": pa.array([[]] * k, type=pa.list_(pa.list_(pa.float64()))),
                          "sha256": ["0" * 64] * k}, schema=shards.META_SCHEMA)
        shards.write_meta(str(out), stem, table)
        names.append(stem)
    write_json(out / "manifest.json", {"source": "bench", "uri": ".", "bench": spec, "shards": names})


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(arch: str, data: Path, batch: int, workers: int, device: str, compile_: bool, out: Path,
            decodes: list[str]) -> dict:
    import shutil

    import open_clip

    from winnow.embed import Encoder, embed_shards
    from winnow.jobs import WorkDir
    from winnow.pool.view import Pool

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    tokenizer = open_clip.get_tokenizer(arch)
    pool = Pool.open(str(data))
    n_images = sum(len(pool.batch(s).column("uid")) for s in pool.shards)
    size = model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0]

    # model only: the same shapes, tensors already on the host, no I/O or decode
    enc = Encoder(model, device, compile_)
    x = torch.randn(batch, 3, size, size)
    tokens = tokenizer(["a photo of texture number 1 in the bench pool"] * batch)
    if device.startswith("cuda"):
        x, tokens = x.pin_memory(), tokens.pin_memory()
    for _ in range(2):                                    # warm-up (and compilation)
        enc.images(torch.cat([x, x]))
        enc.texts(tokens, batch)
    _sync(device)
    steps = max(1, n_images // batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        enc.images(torch.cat([x, x]))
        enc.texts(tokens, batch)
    _sync(device)
    model_only = steps * batch / (time.perf_counter() - t0)

    # end to end through the embed stage's path, twice per decode mode: the first warms caches and kernels
    res = {"images": n_images, "batch": batch, "model_only_images_per_s": model_only}
    for decode in decodes:
        for _ in range(2):
            shutil.rmtree(out, ignore_errors=True)
            work = WorkDir("embed", "bench", out)
            _sync(device)
            t0 = time.perf_counter()
            embed_shards(pool, pool.shards, model, preprocess, tokenizer, work, name="bench", batch_size=batch,
                         workers=workers, device=device, compile=compile_, decode=decode,
                         progress=f"e2e {arch} ({decode} decode)")
            _sync(device)
            e2e = n_images / (time.perf_counter() - t0)
        res[f"end_to_end_{decode}_images_per_s"] = e2e
        res[f"ratio_{decode}"] = e2e / model_only
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="ViT-B-32,ViT-L-14")
    ap.add_argument("--images", default="256,64", help="pool size per arch (comma list, same order)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--decode", default=None, help="pil | tensor | both (default: both on CUDA, pil on CPU)")
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--data", type=Path, default=ROOT / "bench" / ".data" / "embed")
    args = ap.parse_args()
    archs = args.archs.split(",")
    counts = [int(x) for x in args.images.split(",")]
    results = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)",
               "torch": torch.__version__, "compile": args.compile, "workers": args.workers,
               "precision": "bf16 autocast" if args.device.startswith("cuda") else "fp32", "archs": {}}
    for arch, n in zip(archs, counts):
        data = args.data / f"pool-{n}"
        generate(data, n, per_shard=max(args.batch, n // 4), side=args.side)
        decodes = {"both": ["pil", "tensor"], None: ["pil", "tensor"] if args.device.startswith("cuda") else ["pil"]}.get(
            args.decode, [args.decode])
        results["archs"][arch] = measure(arch, data, args.batch, args.workers, args.device, args.compile,
                                         args.data / f"out-{arch}", decodes)
        print(arch, json.dumps(results["archs"][arch]), flush=True)
    out = ROOT / "reports" / "bench" / "embed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
