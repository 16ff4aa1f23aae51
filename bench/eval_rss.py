"""Peak memory of a real-size evaluation: does it stay flat as the set grows?

    python bench/eval_rss.py                          # 50,000 images, 10 shards, winnow-tiny on CPU, 0 and 1 worker
    python bench/eval_rss.py --images 108754 --workers 2 --batch 256

Generates (once, under bench/.data/, gitignored) a classification set in DataComp's layout
(``wds_bench_test/``: classnames.txt, zeroshot_classification_templates.txt, test/nshards.txt,
test/{i}.tar of JPEGs of 64-128 px with .cls labels), then evaluates it with
``winnow.evaluate.evaluate_suite`` exactly as the evaluate stage does, in a child process. The parent
samples the resident set size of the child and all its descendants (the spawned DataLoader workers)
every 50 ms with psutil and records the peak of their sum — an upper bound, since pages shared
between the processes (torch's libraries) count once per process — and, once a second, the sum of
their PSS (shared pages divided among the processes: the true footprint), with the wall time, into
``reports/bench/eval_rss.json``. Target: under 2 GB of summed RSS for 50,000 images, flat in the
set's size (``rss_timeline_mb``).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT / "bench" / ".data" / "eval_rss"
OUT = ROOT / "reports" / "bench" / "eval_rss.json"
CLASSES = 100


def generate(root: Path, images: int, shards: int, seed: int = 0) -> Path:
    """The set, skipped when a previous run wrote the same spec."""
    import tarfile

    import numpy as np
    from PIL import Image

    d = root / "wds_bench_test"
    spec = {"images": images, "shards": shards, "seed": seed, "classes": CLASSES}
    marker = d / "bench.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return d
    (d / "test").mkdir(parents=True, exist_ok=True)
    (d / "classnames.txt").write_text("".join(f"texture {i}\n" for i in range(CLASSES)))
    (d / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\nan image of {c}.\n")
    rng = np.random.default_rng(seed)
    per = -(-images // shards)
    t0 = time.time()
    for s in range(shards):
        with tarfile.open(d / "test" / f"{s}.tar", "w") as tf:
            for i in range(s * per, min(images, (s + 1) * per)):
                side = int(rng.integers(64, 129))
                small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(small).resize((side, side), Image.BILINEAR).save(buf, "JPEG", quality=85)
                for name, data in ((f"{i:07d}.jpg", buf.getvalue()), (f"{i:07d}.cls", str(i % CLASSES).encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(data), 1_700_000_000
                    tf.addfile(info, io.BytesIO(data))
        print(f"generate: shard {s + 1}/{shards} ({time.time() - t0:.0f}s)", file=sys.stderr)
    (d / "test" / "nshards.txt").write_text(f"{shards}\n")
    marker.write_text(json.dumps(spec))
    return d


def child(args) -> None:
    """The evaluation itself (what stages/evaluate.py runs), reporting its result as JSON on stdout."""
    import tempfile

    import torch

    from winnow import models
    from winnow.evaluate import evaluate_suite
    from winnow.tasks import Suite, Task

    torch.manual_seed(0)
    model, pre, tok = models.load(args.model, None)
    suite = Suite(layout="datacomp", tasks=[Task(key="bench", name="bench", type="zeroshot_classification",
                                                 main_metric="acc1", group="Other")])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        rows = evaluate_suite(model, pre, tok, suite, str(args.root), f"{tmp}/results.jsonl", batch_size=args.batch,
                              workers=args.workers[0], device=args.device)
        wall = time.time() - t0
    r = rows[0]
    print(json.dumps({"status": r["status"], "n": r["metrics"].get("n"), "acc1": r["main"], "eval_wall_s": wall,
                      "precision": r.get("precision"), "reason": r.get("reason")}))


def tree_rss(proc) -> tuple[int, int, int]:
    """(sum of RSS over the process and its descendants, RSS of the process, process count)."""
    import psutil

    try:
        main = proc.memory_info().rss
        kids = proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0, 0
    total = main
    for k in kids:
        try:
            total += k.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total, main, 1 + len(kids)


def tree_pss(proc) -> int:
    """Sum of PSS (shared pages divided among the processes mapping them): the tree's true footprint."""
    import psutil

    total = 0
    for q in [proc] + proc.children(recursive=True):
        try:
            total += q.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
            pass
    return total


def measure(args) -> dict:
    import psutil

    cmd = [sys.executable, __file__, "--child", "--root", str(args.root), "--model", args.model,
           "--batch", str(args.batch), "--workers", str(args.workers), "--device", args.device]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, cwd=str(ROOT), text=True)
    proc = psutil.Process(p.pid)
    peak_tree = peak_main = peak_pss = procs = samples = 0
    timeline = []
    while p.poll() is None:
        tot, main, n = tree_rss(proc)
        peak_tree, peak_main, procs = max(peak_tree, tot), max(peak_main, main), max(procs, n)
        samples += 1
        if samples % 20 == 0:   # once a second: the PSS sum (reading smaps is slower) and a point for the record
            try:
                peak_pss = max(peak_pss, tree_pss(proc))
            except psutil.NoSuchProcess:
                pass
            timeline.append([round(time.time() - t0, 1), round(tot / 2**20)])
        time.sleep(0.05)
    out, _ = p.communicate()
    wall = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(f"child failed with exit code {p.returncode}")
    res = json.loads(out.strip().splitlines()[-1])
    return {"peak_rss_tree_mb": round(peak_tree / 2**20, 1), "peak_rss_main_mb": round(peak_main / 2**20, 1),
            "peak_pss_tree_mb": round(peak_pss / 2**20, 1),
            "max_processes": procs, "rss_samples": samples, "wall_s": round(wall, 1),
            "eval_wall_s": round(res["eval_wall_s"], 1), "images_per_s": round(res["n"] / res["eval_wall_s"], 1),
            "scored_images": res["n"], "status": res["status"], "precision": res["precision"],
            "rss_timeline_mb": timeline}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--model", default="winnow-tiny")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="one run per count (the child takes one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--root", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    generate(args.root, args.images, args.shards)
    tars = sorted((args.root / "wds_bench_test" / "test").glob("*.tar"))
    record = {
        "command": "python bench/eval_rss.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs: wall times are noisy)",
        "device": args.device, "model": args.model, "images": args.images, "shards": args.shards,
        "set_bytes": sum(t.stat().st_size for t in tars), "batch": args.batch, "target_mb": 2048, "runs": [],
    }
    for w in args.workers:
        run = measure(argparse.Namespace(**{**vars(args), "workers": w}))
        run = {"workers": w, **run, "under_target": run["peak_rss_tree_mb"] < 2048}
        record["runs"].append(run)
        print(json.dumps({k: v for k, v in run.items() if k != "rss_timeline_mb"}), file=sys.stderr)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
