"""Filter throughput and peak memory at pool scale, against the straightforward way, in one run.

    python bench/filter.py                       # 1,000,000 samples, 100 shards, 768-d float16
    python bench/filter.py --samples 250000 --shards 25 --data bench/.data/pool250k \
        --report reports/bench/filter_250k.json      # memory against pool size

A DataComp-format pool (metadata parquet + ``l14_img``/``l14_txt`` npz) is generated once under
``--data`` (reused when its parameters match). Each measurement runs in its own process; its peak
RSS is the largest sum over that process and all its children (workers), sampled every 20 ms.

"winnow" is the recipe engine (only the needed columns, vectorised steps, a shard at a time on
``--workers`` processes, the default ``decide: survivors``; ``basic`` is also measured with
``decide: all``, where every step decides every sample). "straightforward" is what DataComp's
reference helpers (``baselines/apply_filter.py``) do, applied to the whole pool in one pandas
DataFrame of the columns they read: language id, ``len(x.split())`` and ``len(x)`` per row with
``Series.apply``; uids per row with ``int(uid, 16)`` (basic) or ``int(uid[:16], 16)`` (CLIP score);
the threshold as ``-np.sort(-scores)[int(N*f)]``; embedding scores from every shard's npz loaded
and cast to float32 as ``apply_filter.py`` does. Results go to ``reports/bench/filter.json``.

    recipes: basic | clip_l14_top30 (the pool's metadata score column) |
             clip_score_top30 on the l14_img/l14_txt embeddings (cosine computed per shard)
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


def caption_vocab(rng) -> np.ndarray:
    """A vocabulary of captions, drawn per row: realistic lengths and a language mix."""
    from winnow.demo import world
    from winnow.demo.world import Scene

    vocab = [world.caption_en(Scene.random(rng), rng) for _ in range(5000)]
    vocab += [world.caption_foreign(Scene.random(rng), rng)[0] for _ in range(600)]
    vocab += [world.caption_uninformative(rng) for _ in range(400)]
    return np.array(vocab, dtype=object)


def meta_table(rng, per: int, vocab: np.ndarray, score: np.ndarray):
    """One shard's metadata with DataComp's nine columns; ``score`` is the L/14 similarity."""
    import pyarrow as pa

    from winnow.pool import shards

    hexes = [r.tobytes().hex() for r in rng.integers(0, 256, (per, 16), dtype=np.uint8)]
    w = rng.integers(64, 2000, per)
    h = (w / rng.uniform(0.3, 3.5, per)).astype(np.int64).clip(32)
    return pa.table({
        "uid": hexes, "url": [f"https://example.com/{x}.jpg" for x in hexes], "text": vocab[rng.integers(0, len(vocab), per)].tolist(),
        "original_width": w, "original_height": h,
        "clip_b32_similarity_score": (score + rng.normal(0.03, 0.02, per)).astype(np.float32),
        "clip_l14_similarity_score": score.astype(np.float32),
        "face_bboxes": pa.array([[]] * per, type=pa.list_(pa.list_(pa.float64()))),
        "sha256": [r.tobytes().hex() for r in rng.integers(0, 256, (per, 32), dtype=np.uint8)],
    }, schema=shards.META_SCHEMA)


def generate(out: Path, samples: int, shards_n: int, dim: int, seed: int = 0) -> None:
    from winnow.io import write_json
    from winnow.pool import shards

    spec = {"samples": samples, "shards": shards_n, "dim": dim, "seed": seed}
    if (out / "manifest.json").exists() and json.loads((out / "manifest.json").read_text()).get("bench") == spec:
        return
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per = samples // shards_n
    vocab = caption_vocab(rng)
    for n in range(shards_n):
        t0 = time.time()
        img = rng.standard_normal((per, dim), dtype=np.float32)
        txt = rng.standard_normal((per, dim), dtype=np.float32)
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        txt = 0.3 * img + txt / np.linalg.norm(txt, axis=1, keepdims=True)
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
        img16, txt16 = img.astype(np.float16), txt.astype(np.float16)
        score = np.einsum("nd,nd->n", img16.astype(np.float32), txt16.astype(np.float32))
        shards.write_meta(str(out), shards.stem(n), meta_table(rng, per, vocab, score))
        shards.write_npz(str(out), shards.stem(n), {"l14_img": img16, "l14_txt": txt16})
        print(f"generated shard {n + 1}/{shards_n} in {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
    write_json(out / "manifest.json", {"source": "bench", "uri": ".", "bench": spec,
                                       "shards": [shards.stem(n) for n in range(shards_n)]})


# what each measured case runs: (winnow recipe, its overrides, decide mode)
CASES = {
    "basic": ("basic", {}, "survivors"),
    "basic/decide=all": ("basic", {}, "all"),
    "clip_l14_top30": ("clip_l14_top30", {}, "survivors"),
    "clip_score_top30/l14 embeddings": ("clip_score_top30", {"clip_score": {"score": None, "embeddings": ["l14_img", "l14_txt"]}}, "survivors"),
}


def run_winnow(data: Path, case: str, workers: int, out: Path) -> int:
    from winnow.executor import Executor
    from winnow.filters.engine import load_recipe, run
    from winnow.pool.view import Pool

    recipe, overrides, decide = CASES[case]
    f = run(load_recipe(recipe, overrides), Pool.open(str(data)), str(out),
            executor=Executor("processes" if workers > 1 else "serial", workers), decide=decide)
    return f["pool_size"]


def run_straightforward(data: Path, case: str, out: Path) -> int:
    """DataComp's reference helpers (baselines/apply_filter.py), over one whole-pool DataFrame."""
    import pandas as pd

    recipe = CASES[case][0]
    files = sorted(data.glob("*.parquet"))
    read = lambda cols: pd.concat([pd.read_parquet(f, columns=cols) for f in files], ignore_index=True)  # noqa: E731
    if recipe == "basic":       # load_uids_with_basic_filter_helper
        from winnow.filters.text import _lid_model

        model = _lid_model()
        df = read(["uid", "text", "original_width", "original_height"])
        lang = df.text.apply(lambda x: model.predict(x.replace("\n", " "))[0][0].split("__label__")[1])
        words = df.text.apply(lambda x: len(x.split()))
        chars = df.text.apply(lambda x: len(x))
        uid_int = df.uid.apply(int, base=16)
        inds = np.array(list(zip((uid_int // 2**64).astype("uint64"), (uid_int % 2**64).astype("uint64"))), "u8,u8")
        side = np.minimum(df.original_width, df.original_height)
        aspect = np.maximum(df.original_width, df.original_height) / side
        arr = inds[((lang == "en") & (words > 2) & (chars > 5) & (side >= 200) & (aspect <= 3.0)).to_numpy()]
    else:                       # get_threshold + load_uids_with_clip_score_helper
        if recipe == "clip_l14_top30":
            df = read(["uid", "clip_l14_similarity_score"])
            s = df.clip_l14_similarity_score.to_numpy()
        else:                   # the embeddings of every shard in memory, cast to float32 as apply_filter does
            df = read(["uid"])
            img, txt = ([np.load(f.with_suffix(".npz"))[k].astype(np.float32) for f in files] for k in ("l14_img", "l14_txt"))
            img, txt = np.concatenate(img), np.concatenate(txt)
            s = np.einsum("nd,nd->n", img, txt)
        threshold = -np.sort(-s)[int(len(s) * 0.3)]
        arr = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in df.uid[s >= threshold].values], np.dtype("u8,u8"))
    arr.sort()
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "uids.npy", arr)
    return len(df)


class TreeRSS:
    """Peak of (this process + all its descendants)' resident memory, sampled every 20 ms."""

    def __init__(self):
        import threading

        import psutil

        self.peak, self._stop = 0, threading.Event()
        self._me = psutil.Process()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        import psutil

        while not self._stop.is_set():
            total = 0
            for p in [self._me, *self._me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.02)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def _child(args) -> None:
    """One measurement in this process: prints seconds, samples and peak RSS as JSON."""
    rss = TreeRSS()
    t0 = time.perf_counter()
    n = (run_winnow(args.data, args.case, args.workers, args.out) if args.way == "winnow"
         else run_straightforward(args.data, args.case, args.out))
    dt = time.perf_counter() - t0
    tree = rss.stop()
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"seconds": dt, "samples": n, "samples_per_s": n / dt, "peak_rss_mb": max(tree, own),
                      "peak_rss_driver_mb": own, "peak_rss_largest_worker_mb": worker}))


def measure(way: str, case: str, data: Path, workers: int, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", way, "--case", case, "--data", str(data),
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
    ap.add_argument("--case", default=None, help="(child) the case to run")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated cases to measure")
    ap.add_argument("--report", type=Path, default=ROOT / "reports" / "bench" / "filter.json")
    ap.add_argument("--child", choices=["winnow", "straightforward"])
    args = ap.parse_args()
    if args.child:
        args.way = args.child
        return _child(args)
    generate(args.data, args.samples, args.shards, args.dim)
    results = {"pool": {"samples": args.samples, "shards": args.shards, "dim": args.dim, "dtype": "float16"},
               "machine": {"cpus": os.cpu_count()}, "workers": args.workers, "straightforward_workers": 1,
               "recipes": {}}
    for case in args.cases.split(","):
        slug = case.replace("/", "_").replace(" ", "_").replace("=", "_")
        ours = measure("winnow", case, args.data, args.workers, args.out / f"winnow_{slug}")
        base = measure("straightforward", case, args.data, 1, args.out / f"straightforward_{slug}")
        same = (args.out / f"winnow_{slug}" / "uids.npy").read_bytes() == \
               (args.out / f"straightforward_{slug}" / "uids.npy").read_bytes()
        results["recipes"][case] = {"winnow": ours, "straightforward": base,
                                    "throughput_ratio": ours["samples_per_s"] / base["samples_per_s"],
                                    "same_uids": same}
        print(case, json.dumps(results["recipes"][case], indent=1), flush=True)
    out = args.report
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
