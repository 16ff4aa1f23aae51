"""How much better than DataComp's baselines could any filter do on the demo world?

    python bench/headroom.py                     # seeds 0,1,2 at the tiny scale, in this workspace
    python bench/headroom.py --seeds 0 --scale tiny

The demo pool knows every sample's truth (``data/pool/truth.parquet``, which no filter reads). This
writes the oracle subset a perfect filter would keep, every clean pair and near duplicate and
nothing else, as a DataComp uid file (``data/oracle/clean.npy``), and the same subset with only the
parrots taken out of ``clip_score_top30``'s (``data/oracle/clip_no_parrots.npy``: what a perfect
flip rule could add to the CLIP cut). Each runs as a sweep point (a ``uid_list`` recipe, per seed:
DVC experiments and MLflow runs, cached in ``reports/compare/demo/`` like any point) beside the
baselines and ``devil_in_details``; the table, compared with ``image_based_x_clip``, goes to
``reports/bench/headroom.md``. Where the oracle itself does not beat the baselines beyond the seed
spread, no recipe can on this world at this scale.

Needs the workspace's pool and scorer embeddings (``dvc repro embed`` with the shipped params).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from winnow import sweep  # noqa: E402
from winnow.io import atomic_file, write_json  # noqa: E402
from winnow.pool import uids as U  # noqa: E402

ORACLE = Path("data/oracle")
OUT = Path("reports/bench/headroom.md")
COMPARED = ["clip_score_top30", "image_based_x_clip", "devil_in_details"]
CLEAN = ["clean", "near_duplicate"]       # exact duplicates add no new pair; bad sizes are filtered by every recipe


def oracle_files() -> dict[str, Path]:
    import pandas as pd

    from winnow.filters.engine import load_recipe, run
    from winnow.pool.view import Pool

    truth = pd.read_parquet("data/pool/truth.parquet")
    ORACLE.mkdir(parents=True, exist_ok=True)
    files = {"oracle-clean": ORACLE / "clean.npy", "oracle-clip-no-parrots": ORACLE / "clip_no_parrots.npy"}
    U.save(files["oracle-clean"], U.hex_to_array(truth.uid[truth.kind.isin(CLEAN)].tolist()))
    with tempfile.TemporaryDirectory() as d:
        run(load_recipe("clip_score_top30"), Pool.open("data/pool", embed_uri="data/embed"), d, decisions=False)
        kept = set(U.array_to_hex(U.load(Path(d) / "uids.npy")))
    parrots = set(truth.uid[truth.kind == "scene_text"])
    U.save(files["oracle-clip-no-parrots"], U.hex_to_array(sorted(kept - parrots)))
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--scale", default="tiny")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    oracles = [{"name": name, "description": f"truth oracle: the uids in {path}",
                "bounds": {"min_fraction": 0.0, "max_fraction": 1.0},
                "steps": [{"step": "uid_list", "path": str(path)}]} for name, path in oracle_files().items()]
    rows = sweep.sweep(oracles + COMPARED, seeds, a.scale)
    text, stats = sweep.table(rows, baseline="image_based_x_clip")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(OUT) as tmp:
        Path(tmp).write_text("<!-- python bench/headroom.py: truth oracles beside the baselines -->\n" + text)
    write_json(OUT.with_suffix(".json"), {"runs": rows, "stats": stats})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
