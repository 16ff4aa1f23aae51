"""Filter throughput and peak memory at pool scale, against the straightforward way, in one run.

    python bench/filter.py                       # 1,000,000 samples, 100 shards, 768-d float16
    python bench/filter.py --samples 100000 --shards 10

A DataComp-format pool (metadata parquet + ``l14_img``/``l14_txt`` npz) is generated once under
``--data`` (reused when its parameters match). Each measurement runs in its own process so peak RSS
is its own. "winnow" is the recipe engine (only the needed columns, vectorised steps, shard at a
time, ``--workers`` processes). "straightforward" is what DataComp's reference scripts do: the whole
pool's metadata in one pandas DataFrame, language id and caption length per row with
``DataFrame.apply``, uids converted per row with ``int(uid[:16], 16)``. Results go to
``reports/bench/filter.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def generate(out: Path, samples: int, shards_n: int, dim: int, seed: int = 0) -> None:
    import pyarrow as pa

    from winnow.io import write_json
    from winnow.pool import shards, world
    from winnow.pool.world import Scene

    spec = {"samples": samples, "shards": shards_n, "dim": dim, "seed": seed}
    if (out / "manifest.json").exists() and json.loads((out / "manifest.json").read_text()).get("bench") == spec:
        return
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per = samples // shards_n
    # a vocabulary of captions, drawn per row: realistic lengths and a language mix
    vocab = [world.caption_en(Scene.random(rng), rng) for _ in range(5000)]
    vocab += [world.caption_foreign(Scene.random(rng), rng)[0] for _ in range(600)]
    vocab += [world.caption_uninformative(rng) for _ in range(400)]
    vocab = np.array(vocab, dtype=object)
    for n in range(shards_n):
        t0 = time.time()
        hexes = [r.tobytes().hex() for r in rng.integers(0, 256, (per, 16), dtype=np.uint8)]
        text = vocab[rng.integers(0, len(vocab), per)]
        img = rng.standard_normal((per, dim), dtype=np.float32)
        txt = rng.standard_normal((per, dim), dtype=np.float32)
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        txt = 0.3 * img + txt / np.linalg.norm(txt, axis=1, keepdims=True)
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
        img16, txt16 = img.astype(np.float16), txt.astype(np.float16)
        score = np.einsum("nd,nd->n", img16.astype(np.float32), txt16.astype(np.float32))
        w = rng.integers(64, 2000, per)
        h = (w / rng.uniform(0.3, 3.5, per)).astype(np.int64).clip(32)
        table = pa.table({
            "uid": hexes, "url": [f"https://example.com/{x}.jpg" for x in hexes[:per]], "text": text.tolist(),
            "original_width": w, "original_height": h,
            "clip_b32_similarity_score": (score + rng.normal(0.03, 0.02, per)).astype(np.float32),
            "clip_l14_similarity_score": score.astype(np.float32),
            "face_bboxes": pa.array([[]] * per, type=pa.list_(pa.list_(pa.float64()))),
            "sha256": [r.tobytes().hex() for r in rng.integers(0, 256, (per, 32), dtype=np.uint8)],
        }, schema=shards.META_SCHEMA)
        shards.write_meta(str(out), shards.stem(n), table)
        shards.write_npz(str(out), shards.stem(n), {"l14_img": img16, "l14_txt": txt16})
        print(f"generated shard {n + 1}/{shards_n} in {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
    write_json(out / "manifest.json", {"source": "bench", "uri": ".", "bench": spec,
                                       "shards": [shards.stem(n) for n in range(shards_n)]})


def run_winnow(data: Path, recipe: str, workers: int, out: Path) -> int:
    from winnow.filters.engine import load_recipe, run
    from winnow.pool.view import Pool

    f = run(load_recipe(recipe), Pool.open(str(data)), str(out),
            executor="processes" if workers > 1 else "serial", workers=workers)
    return f["pool_size"]


def run_straightforward(data: Path, recipe: str, out: Path) -> int:
    import pandas as pd

    files = sorted(data.glob("*.parquet"))
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    if recipe == "basic":
        from winnow.filters.text import _lid_model

        model = _lid_model()
        lang = df.text.apply(lambda t: model.predict(t.strip().replace("\n", " "), k=1)[0][0].replace("__label__", ""))
        words = df.text.apply(lambda t: len(t.split()))
        chars = df.text.apply(len)
        side = df[["original_width", "original_height"]].min(axis=1)
        aspect = df[["original_width", "original_height"]].max(axis=1) / side
        mask = (lang == "en") & (words > 2) & (chars > 5) & (side >= 200) & (aspect <= 3.0)
    else:   # clip_l14_top30
        s = df.clip_l14_similarity_score.to_numpy()
        mask = s >= -np.sort(-s)[int(len(s) * 0.3)]
    kept = df.uid[mask]
    arr = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in kept], np.dtype("u8,u8"))
    arr.sort()
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "uids.npy", arr)
    return len(df)


def _child(args) -> None:
    """One measurement in this process: prints seconds, samples and peak RSS as JSON."""
    t0 = time.perf_counter()
    n = (run_winnow(args.data, args.recipe, args.workers, args.out) if args.way == "winnow"
         else run_straightforward(args.data, args.recipe, args.out))
    dt = time.perf_counter() - t0
    peak_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print(json.dumps({"seconds": dt, "samples": n, "samples_per_s": n / dt, "peak_rss_mb": peak_kb / 1024}))


def measure(way: str, recipe: str, data: Path, workers: int, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", way, "--recipe", recipe, "--data", str(data),
           "--workers", str(workers), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data", type=Path, default=ROOT / "bench" / ".data" / "pool")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / ".data" / "out")
    ap.add_argument("--recipe", default=None)
    ap.add_argument("--child", choices=["winnow", "straightforward"])
    args = ap.parse_args()
    if args.child:
        args.way = args.child
        return _child(args)
    generate(args.data, args.samples, args.shards, args.dim)
    results = {"pool": {"samples": args.samples, "shards": args.shards, "dim": args.dim, "dtype": "float16"},
               "machine": {"cpus": os.cpu_count()}, "workers": args.workers, "recipes": {}}
    for recipe in ("basic", "clip_l14_top30"):
        ours = measure("winnow", recipe, args.data, args.workers, args.out / f"winnow_{recipe}")
        base = measure("straightforward", recipe, args.data, 1, args.out / f"straightforward_{recipe}")
        same = (args.out / f"winnow_{recipe}" / "uids.npy").read_bytes() == \
               (args.out / f"straightforward_{recipe}" / "uids.npy").read_bytes()
        results["recipes"][recipe] = {"winnow": ours, "straightforward": base,
                                      "throughput_ratio": ours["samples_per_s"] / base["samples_per_s"],
                                      "same_uids": same}
        print(recipe, json.dumps(results["recipes"][recipe], indent=1), flush=True)
    out = ROOT / "reports" / "bench" / "filter.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
