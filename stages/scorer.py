"""Stage `scorer`: the filtering CLIP. Trained in-pipeline on trusted pairs (DFN-style) unless
`scorer.pretrained` names weights; gate: training healthy, checkpoint loads, and it separates
matched from mismatched held-out pairs. Skipped (no model loaded or trained) when the plan says the
recipe needs none."""
import pandas as pd

from winnow import models, track
from winnow.config import Params
from winnow.io import atomic_dir, cache_local, local, read_json, write_json
from winnow.demo import pool as demo
from winnow.scorer_quality import scorer_quality
from winnow.stage import main
from winnow.train import curve_for_disk, loss_is_healthy, train_clip
from winnow.validate import Gate, expect

OUT = "models/scorer"


def body(p: Params) -> dict:
    s = p.scorer
    gate = Gate("scorer")
    E = expect()
    metrics = {}
    plan = read_json("data/plan/scorer.json")
    with atomic_dir(OUT) as tmp:
        name = models.embedding_name(s.model, s.pretrained, s.name)
        if not plan["scorer"]:   # the recipe reads only the pool's metadata and embeddings: no model at all
            write_json(tmp / "scorer.json", {"model": None, "weights": None, "name": None,
                                             "skipped": "the recipe needs no scorer (data/plan/scorer.json)"})
            write_json(tmp / "quality.json", {})
            gate.finish()
            for f in ("scorer.json", "quality.json"):
                track.log_artifact(str(tmp / f))
            return {"needed": 0}
        if s.pretrained is None:
            t = s.train
            trusted = sorted(cache_local(t.trusted_uri).glob("*.tar"))   # s3:// is fetched into the cache
            if not trusted:
                raise models.ModelError(f"no trusted shards under {t.trusted_uri} to train the scorer on")
            n = sum(read_json(str(x)[:-4] + "_stats.json")["count"] for x in trusted)
            r = train_clip(data="::".join(map(str, trusted)), model=s.model, samples_seen=n * t.epochs,
                           batch_size=t.batch_size, lr=t.lr, warmup=t.warmup, wd=t.wd, beta2=0.98,
                           checkpoints=2, out_dir=tmp, seed=p.seed, job="scorer")
            ok, why = loss_is_healthy(r["curve"])
            gate.check("training", pd.DataFrame([{"run": "scorer", "healthy": ok, "why": why}]),
                       [E.ExpectColumnValuesToBeInSet(column="healthy", value_set=[True])], id_column="why")
            write_json(tmp / "curve.json", curve_for_disk(r["curve"]))
            track.log_curve(r["curve"], prefix="scorer")
            weights = str(local(OUT) / "checkpoint.pt")
            model, pre, tok = models.load(s.model, str(tmp / "checkpoint.pt"))
            metrics.update({"final_loss": r["curve"][-1]["loss"], "steps": r["steps"]})
        else:
            weights = s.pretrained
            model, pre, tok = models.load(s.model, s.pretrained)
        quality = scorer_quality(model, pre, tok, demo.heldout_pairs(p.pool, p.seed)) if p.pool.source == "demo" else {}
        if quality:
            gate.check("separation", pd.DataFrame([{"model": s.model, **quality}]),
                       [E.ExpectColumnValuesToBeBetween(column="auc_matched_vs_mismatched", min_value=s.min_auc)],
                       id_column="model")
        write_json(tmp / "quality.json", quality)
        write_json(tmp / "scorer.json", {"model": s.model, "weights": weights, "name": name})
        gate.finish()
        for f in ("scorer.json", "quality.json", "curve.json"):
            track.log_artifact(str(tmp / f))
    return {"needed": 1, **metrics, **{k: v for k, v in quality.items() if v is not None}}


if __name__ == "__main__":
    main("scorer", body)
