"""Stage `train`: open_clip_train on the resharded subset with a scale preset (samples seen is the
budget); gate: loss finite and decreasing, checkpoint loadable."""
import pandas as pd

from winnow import models, track
from winnow.config import Params, load_scale
from winnow.io import atomic_dir, read_json, write_json
from winnow.reshard import brace_pattern
from winnow.stage import main
from winnow.train import curve_for_disk, loss_is_healthy, train_clip
from winnow.validate import Gate, expect

OUT = "models/clip"


def body(p: Params) -> dict:
    scale = load_scale(p.train.scale)
    meta = read_json("data/subset/meta.json")
    with atomic_dir(OUT) as tmp:
        r = train_clip(data=brace_pattern("data/subset", meta), model=scale["model"],
                       samples_seen=scale["samples_seen"], batch_size=scale["batch_size"], lr=scale["lr"],
                       warmup=scale["warmup"], wd=scale["wd"], beta2=scale["beta2"],
                       checkpoints=scale["checkpoints"], out_dir=tmp, seed=p.train.seed)
        track.log_curve(r["curve"])
        write_json(tmp / "curve.json", curve_for_disk(r["curve"]))
        ok, why = loss_is_healthy(r["curve"])
        try:
            models.load(scale["model"], str(tmp / "checkpoint.pt"))
            loads = True
        except Exception as exc:  # reported by the gate below
            loads, why = False, f"{why}; checkpoint does not load: {exc}"
        E = expect()
        gate = Gate("train")
        gate.check("training", pd.DataFrame([{"why": why, "healthy": ok, "loads": loads}]), [
            E.ExpectColumnValuesToBeInSet(column="healthy", value_set=[True]),
            E.ExpectColumnValuesToBeInSet(column="loads", value_set=[True]),
        ], id_column="why")
        gate.finish()
        info = {"model": scale["model"], "scale": p.train.scale, "samples_seen": scale["samples_seen"],
                "subset_size": meta["output_count"], "checkpoint": f"{OUT}/checkpoint.pt", "steps": r["steps"],
                "resumed_from_epochs": r["resumed_from_epochs"]}
        write_json(tmp / "info.json", info)
        for name in ("info.json", "curve.json"):
            track.log_artifact(str(tmp / name))
    return {"final_loss": r["curve"][-1]["loss"], "steps": r["steps"], "samples_seen": scale["samples_seen"],
            "samples_per_s": sum(x["samples_per_s"] for x in r["curve"][-10:]) / min(10, len(r["curve"]))}


if __name__ == "__main__":
    main("train", body)
