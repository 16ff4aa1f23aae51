"""CLIP training through open_clip_train, run in-process (its CLI cannot see our model configs).

Used twice: the ``scorer`` stage trains the filtering network on trusted pairs; the ``train`` stage
trains the evaluated model on the filtered subset. Samples seen is the budget: open_clip_train's
"epochs" are checkpoints of ``samples_seen / checkpoints`` samples each, drawn with resampling.

open_clip_train decodes every member of a sample with webdataset's default decoders, which
``pickle.loads`` ``.pyd``/``.pickle`` members and ``torch.load`` ``.pth`` ones: a trusted set from a
third party (``scorer.train.trusted_uri``) could run code. So it is never handed the shards
themselves: :func:`sanitize_shards` checks each one against an allowlist of member types
(jpg/jpeg/png/webp/txt/json/cls, regular files, at most 64 MiB each, images at most
``decode.MAX_PIXELS`` by their header) and hands over a filtered copy, in the run's work directory,
of any shard that holds something else (a clean shard is linked, not copied); the data argument
holds only those local paths (no ``pipe:`` URL, no name of the input's choosing).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import re
import shutil
from pathlib import Path

import torch

from winnow.errors import WinnowError
from winnow.io import atomic_file
from winnow.jobs import WORK_ROOT, Key, WorkDir
from winnow.models import register_configs

# Intra-op threads of CPU training. A float reduction's order (and so a model's last bits) depends on
# how many threads split it: a fixed count makes the checkpoint byte-identical on any machine.
CPU_TRAIN_THREADS = 4
# Console lines of open_clip_train that are expected, not news: training from scratch has no weights.
_QUIET = ("No pretrained weights loaded",)
_LOSS = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+).*?([\d.]+)/s, .*?LR: ([\d.eE+-]+) .*?"
                   r"Contrastive_loss: ([\d.eE+-]+|nan|inf)")


class TrainError(WinnowError, RuntimeError):
    pass


def expand_shards(data: str) -> list[str]:
    """The shard paths of an open_clip_train data argument: ``::``-separated, each brace-expanded."""
    import braceexpand

    return [u for part in data.split("::") if part for u in braceexpand.braceexpand(part)]


def _scan(src: Path, dst: Path | None, max_pixels: int, member_cap: int) -> dict:
    """Read one tar, member by member, keeping only allowlisted ones; write them to ``dst`` when
    given. Returns counts (members read/kept, drops by reason, usable image-text samples)."""
    import io
    import tarfile

    from winnow import decode
    from winnow.io import UnsafePath, check_relative

    stats = {"members": 0, "kept": 0, "dropped": {}, "samples": 0, "error": ""}
    drop = stats["dropped"]
    keys: dict[str, set] = {}
    out = tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) if dst is not None else None
    try:
        with decode.open_tar_stream(str(src), mode="r|*") as tf:
            for m in tf:
                stats["members"] += 1
                reason = None
                key, suffix = decode.member_suffix(m.name)
                if not m.isreg():
                    reason = "not a regular file"
                else:
                    try:
                        check_relative(m.name, "member")
                    except UnsafePath:
                        reason = "unsafe name"
                if reason is None and not decode.allowed_member(m.name):
                    reason = f"type .{suffix or '(none)'}"
                if reason is None and m.size > member_cap:
                    reason = f"larger than {member_cap} bytes"
                data = b""
                if reason is None:
                    data = tf.extractfile(m).read()
                    if len(data) != m.size:
                        raise tarfile.ReadError(f"truncated inside member {m.name!r}")
                    if suffix in decode.IMAGE_SUFFIXES:
                        try:
                            decode.check_image(data, max_pixels)
                        except decode.ImageTooLarge:
                            reason = "image too large"
                        except decode.ImageError:
                            reason = "unreadable image"
                if reason is not None:
                    drop[reason] = drop.get(reason, 0) + 1
                    continue
                stats["kept"] += 1
                keys.setdefault(key, set()).add("image" if suffix in decode.IMAGE_SUFFIXES else suffix)
                if out is not None:
                    info = tarfile.TarInfo(m.name)
                    info.size, info.mode, info.mtime = len(data), 0o644, int(m.mtime)
                    out.addfile(info, io.BytesIO(data))
    except (tarfile.TarError, OSError, EOFError) as exc:
        stats["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if out is not None:
            out.close()
    stats["samples"] = sum(1 for v in keys.values() if {"image", "txt"} <= v)
    return stats


def sanitize_shards(data: str, work: WorkDir, max_pixels: int | None = None,
                    member_cap: int | None = None) -> tuple[str, dict]:
    """What open_clip_train may read of ``data`` (local tar paths, ``::``-separated, brace patterns):
    each shard is scanned against the member allowlist (decode.ALLOWED_SUFFIXES, regular files,
    ``member_cap`` bytes, images at most ``max_pixels`` by their header); a clean shard is linked
    into ``dest`` as is, any other is copied there without what it must not hold. Returns the data
    argument naming only ``dest``'s files, and the counts of what was dropped. A remote or
    ``pipe:`` URL, a missing shard, or nothing usable left raises TrainError. ``dest`` is
    ``data/`` in the job's work directory; each shard is a unit, marked when done (a resumed run
    reuses it)."""
    from winnow import decode

    max_pixels = decode.MAX_PIXELS if max_pixels is None else max_pixels
    member_cap = decode.MAX_MEMBER_BYTES if member_cap is None else member_cap
    dest = (work / "data").absolute()
    if any(c in str(dest) for c in ("::", "{", "}")) or str(dest).startswith("pipe:"):
        raise TrainError(f"work directory {dest} has a name open_clip_train would expand; move the project")
    dest.mkdir(parents=True, exist_ok=True)
    shards, totals = [], {"shards": 0, "copied": 0, "members": 0, "kept": 0, "samples": 0, "dropped": {},
                          "errors": []}
    for i, url in enumerate(expand_shards(data)):
        if "://" in url or url.startswith("pipe:") or url == "-":
            raise TrainError(f"training data must be local tar files, not {url!r} (remote sets are fetched into "
                             ".winnow/cache first)")
        src = Path(url)
        if not src.is_file():
            raise TrainError(f"training shard {url} not found")
        out = dest / f"{i:08d}.tar"
        if (st := work.done(f"data-{i:08d}")) is None or not (out.exists() or out.is_symlink()):
            st = _scan(src, None, max_pixels, member_cap)
            out.unlink(missing_ok=True)
            if st["dropped"] or st["error"]:
                with atomic_file(out) as tmp:
                    st = _scan(src, tmp, max_pixels, member_cap)
                st["copied"] = True
            else:
                os.symlink(src.absolute(), out)
                st["copied"] = False
            work.mark(f"data-{i:08d}", st)
        totals["shards"] += 1
        totals["copied"] += int(st["copied"])
        for k in ("members", "kept", "samples"):
            totals[k] += st[k]
        for r, n in st["dropped"].items():
            totals["dropped"][r] = totals["dropped"].get(r, 0) + n
        if st["error"]:
            totals["errors"].append(f"{url}: {st['error']}")
        shards.append(str(out))
    if not shards:
        raise TrainError(f"no training shards in {data!r}")
    if not totals["samples"]:
        raise TrainError(f"no usable image-text sample in {data!r} after the member allowlist "
                         f"(dropped: {totals['dropped'] or 'nothing'}; errors: {totals['errors'][:3]})")
    if totals["dropped"] or totals["errors"]:
        logging.getLogger(__name__).warning("training data %s: dropped members %s; unreadable: %s", data,
                                            totals["dropped"], totals["errors"][:3])
    return "::".join(shards), totals


def samples_per_checkpoint(samples_seen: int, global_batch: int, checkpoints: int) -> int:
    return max(global_batch, samples_seen // checkpoints)


def open_clip_args(*, data: str, model: str, samples_seen: int, global_batch: int, lr: float, warmup: int,
                   wd: float, beta2: float, checkpoints: int, seed: int = 0, workers: int = 0,
                   precision: str = "amp_bf16", world_size: int = 1, accum: int = 1) -> list[str]:
    """open_clip_train arguments for a samples-seen budget: ``checkpoints`` "epochs" of
    samples_seen / checkpoints samples, drawn with resampling; per-GPU batch = global batch /
    (world size x gradient accumulation), as DataComp's launch scripts set it."""
    if global_batch % (world_size * accum):
        raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size} x accum {accum}")
    return [
        "--train-data", data, "--dataset-type", "webdataset", "--dataset-resampled",
        "--train-num-samples", str(samples_per_checkpoint(samples_seen, global_batch, checkpoints)),
        "--epochs", str(checkpoints), "--batch-size", str(global_batch // (world_size * accum)),
        "--accum-freq", str(accum), "--lr", str(lr), "--warmup", str(warmup), "--wd", str(wd),
        "--beta2", str(beta2), "--model", model, "--seed", str(seed), "--workers", str(workers),
        "--precision", precision, "--save-frequency", "1", "--save-most-recent", "--resume", "latest",
        "--report-to", "",
    ]


def train_clip(*, data: str, model: str, samples_seen: int, batch_size: int, lr: float, warmup: int,
               wd: float, beta2: float, checkpoints: int, out_dir: str | Path, job: str = "train",
               work_root: str | Path = WORK_ROOT, seed: int = 0, workers: int = 0) -> dict:
    """Train and write ``out_dir/checkpoint.pt`` (state_dict only). Returns the loss curve.

    A job of one unit (winnow.jobs): open_clip_train's logs and checkpoints live in its work
    directory, keyed by the arguments, the model config's content, the training shards' content and
    the code: a killed run resumes from its latest checkpoint when called again with the same
    inputs; other keys' leftovers are removed, and the work directory goes once the checkpoint is
    written. open_clip_train reads only what :func:`sanitize_shards` lets through (``data/`` in the
    work directory); the result's ``sanitized`` says what was dropped.
    """

    from open_clip_train.main import main as open_clip_train_main

    register_configs()
    out = Path(out_dir)
    args = open_clip_args(data=data, model=model, samples_seen=samples_seen, global_batch=batch_size, lr=lr,
                          warmup=warmup, wd=wd, beta2=beta2, checkpoints=checkpoints, seed=seed, workers=workers,
                          precision="amp_bf16" if torch.cuda.is_available() else "fp32")
    args += ["--log-every-n-steps", "1"]   # every step in out.log (the curve); the console gets one line per epoch
    if not torch.cuda.is_available():      # open_clip_train's default "cuda" would warn and fall back
        args += ["--device", "cpu"]
    per_epoch = samples_per_checkpoint(samples_seen, batch_size, checkpoints)
    work = WorkDir(job, work_key(job, args, model, data), work_root)
    logs = work.path
    safe_data, sanitized = sanitize_shards(data, work)
    args[args.index("--train-data") + 1] = safe_data
    _repair_latest(logs / "run" / "checkpoints")
    args += ["--logs", str(logs), "--name", "run"]
    root = logging.getLogger()
    handlers = list(root.handlers)
    levels = {n: lg.level for n, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    levels[""] = root.level
    try:
        with _deterministic(seed), _quiet_console():
            rc = open_clip_train_main(args)
    finally:   # open_clip_train adds root handlers and sets every logger to INFO on each call
        for h in root.handlers[len(handlers):]:
            root.removeHandler(h)
            h.close()
        for name, lg in logging.root.manager.loggerDict.items():
            if isinstance(lg, logging.Logger):
                lg.setLevel(levels.get(name, logging.NOTSET))
        root.setLevel(levels[""])
    if rc not in (None, 0):
        raise TrainError(f"open_clip_train exited with {rc}; see {logs / 'run' / 'out.log'}")
    ckpt = logs / "run" / "checkpoints" / "epoch_latest.pt"
    if not ckpt.exists():
        raise TrainError(f"open_clip_train wrote no checkpoint under {ckpt.parent}")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    sd = {k.removeprefix("module."): v for k, v in state["state_dict"].items()}
    torch.save({"state_dict": sd, "model": model, "epoch": state.get("epoch")}, out / "checkpoint.pt")
    log_text = (logs / "run" / "out.log").read_text(encoding="utf-8", errors="replace")
    curve = parse_log(log_text, per_epoch)
    resumed = [int(m) for m in re.findall(r"=> resuming checkpoint .*\(epoch (\d+)\)", log_text)]
    _log_to_mlflow(log_text)   # not into out_dir: the log's timestamps would change the output's bytes
    work.mark("train", {"steps": len(curve)})
    work.release()
    return {"checkpoint": str(out / "checkpoint.pt"), "curve": curve, "steps": len(curve),
            "samples_per_epoch": per_epoch, "resumed_from_epochs": resumed, "sanitized": sanitized}


def curve_for_disk(curve: list[dict]) -> list[dict]:
    """The curve as a stage writes it to its output: without throughput (``samples_per_s`` depends
    on the machine and the moment; it goes to MLflow only), so the same run gives the same bytes."""
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in curve]


def _log_to_mlflow(text: str) -> None:
    """open_clip_train's full log (timestamps, throughput) as the active MLflow run's ``train.log``."""
    import mlflow

    if mlflow.active_run() is not None:
        from winnow.track import scrub

        mlflow.log_text(scrub(text), "train.log")


class _ConsoleFilter(logging.Filter):
    """What of open_clip_train's log reaches the console: warnings and errors (less the expected
    ones, _QUIET), each epoch's last step and resumption; every record still goes to out.log."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            return not msg.startswith(_QUIET)
        return (msg.startswith("Train Epoch:") and "(100%)]" in msg) or msg.startswith("=> resuming checkpoint")


@contextlib.contextmanager
def _quiet_console():
    """open_clip_train logs ~190 lines per small run to the console (its arguments, every step):
    its stream handler gets _ConsoleFilter; the file handler (out.log, the curve's source) is untouched."""
    import open_clip_train.main as ocm

    setup = ocm.setup_logging

    def quiet_setup(*a, **kw):
        before = set(map(id, logging.root.handlers))
        setup(*a, **kw)
        for h in logging.root.handlers:
            if id(h) not in before and type(h) is logging.StreamHandler:
                h.addFilter(_ConsoleFilter())

    ocm.setup_logging = quiet_setup
    try:
        yield
    finally:
        ocm.setup_logging = setup


class _SeededShuffle:
    """webdataset's sample shuffle stage with a seeded rng: pass ``n`` over the data (an epoch)
    draws from ``Random("winnow-shuffle-<seed>-<n>")``. A class, not a closure: it pickles into
    DataLoader workers."""

    def __init__(self, seed: int, bufsize: int = 1000, initial: int = 100, handler=None):
        self.seed, self.bufsize, self.initial, self.handler, self.passes = seed, bufsize, initial, handler, 0

    def __call__(self, data):
        from webdataset.filters import _shuffle

        rng = random.Random(f"winnow-shuffle-{self.seed}-{self.passes}")
        self.passes += 1
        return _shuffle(data, self.bufsize, self.initial, rng=rng, handler=self.handler)


@contextlib.contextmanager
def _deterministic(seed: int):
    """What open_clip_train leaves to chance on one machine, fixed for the run: its sample shuffle
    buffer (``wds.shuffle`` without an rng seeds itself from the pid and the clock; here
    _SeededShuffle) and, on CPU, the thread count (CPU_TRAIN_THREADS). A resumed run restarts the
    pass count, so it draws otherwise than an uninterrupted one."""
    import webdataset as wds

    shuffle, threads = wds.shuffle, torch.get_num_threads()
    wds.shuffle = lambda bufsize=1000, initial=100, handler=None, rng=None: _SeededShuffle(seed, bufsize, initial, handler)
    if not torch.cuda.is_available():
        torch.set_num_threads(CPU_TRAIN_THREADS)
    try:
        yield
    finally:
        wds.shuffle = shuffle
        torch.set_num_threads(threads)


def work_key(job: str, args: list[str], model: str, data: str) -> Key:
    """A training run's inputs: open_clip_train's arguments, the model config's content (a custom
    one in configs/models may change under the same name), the shards' content and the code."""
    import open_clip

    register_configs()
    config = open_clip.get_model_config(model)
    if config is None:
        raise TrainError(f"unknown model '{model}': no open_clip config (configs/models or open_clip's own)")
    return Key(job).params(args=args, model_config=config).files(data=expand_shards(data)).code(__name__)


def _checkpoint_epoch(path: Path) -> int | None:
    """The epoch a checkpoint file completed, or None if it does not load (a save cut by a kill)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except Exception:
        return None


def _repair_latest(ckpt_dir: Path) -> None:
    """open_clip_train resumes only from ``epoch_latest.pt``, which it writes just after
    ``epoch_<n>.pt``: a kill between the two (or during the second) would restart from scratch.
    Point ``epoch_latest.pt`` at the newest ``epoch_<n>.pt`` that loads, when that is newer."""
    if not ckpt_dir.exists():
        return
    latest = ckpt_dir / "epoch_latest.pt"
    have = _checkpoint_epoch(latest) if latest.exists() else None
    numbered = sorted((int(p.stem.split("_")[1]), p) for p in ckpt_dir.glob("epoch_[0-9]*.pt"))
    for n, p in reversed(numbered):
        if have is not None and n <= have:
            return
        if _checkpoint_epoch(p) == n:
            tmp = ckpt_dir / ".epoch_latest.pt.tmp"
            shutil.copyfile(p, tmp)
            os.replace(tmp, latest)
            return


def parse_log(text: str, per_epoch: int) -> list[dict]:
    """Per-step records (samples seen, loss, lr, samples/s) from open_clip_train's text log. After a
    resume the log holds the killed attempt's steps too: a later record for the same step wins."""
    rows: dict[int, dict] = {}
    for line in text.splitlines():
        m = _LOSS.search(line)
        if m:
            ep, n, _, sps, lr, loss = m.groups()
            seen = int(ep) * per_epoch + int(n)
            rows[seen] = {"samples": seen, "loss": float(loss), "lr": float(lr), "samples_per_s": float(sps)}
    return [rows[k] for k in sorted(rows)]


def loss_is_healthy(curve: list[dict]) -> tuple[bool, str]:
    if not curve:
        return False, "no training steps were logged"
    losses = [r["loss"] for r in curve]
    if not all(math.isfinite(x) for x in losses):
        return False, f"non-finite loss at step {next(i for i, x in enumerate(losses) if not math.isfinite(x))}"
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    if last >= first:
        return False, f"loss did not decrease (first {k} steps {first:.4f}, last {k} steps {last:.4f})"
    return True, f"loss {first:.4f} -> {last:.4f}"


if __name__ == "__main__":   # the entry point of generated torchrun commands: our model configs, then open_clip_train
    import sys

    from open_clip_train.main import main as _main

    register_configs()
    sys.exit(_main(sys.argv[1:]))
