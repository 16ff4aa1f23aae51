"""How well each filter step finds the demo's labelled noise (the pool's ``truth.parquet``)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pyarrow.parquet as pq


def truth_metrics(decisions, truth: pd.DataFrame, labels: list[str], batch_rows: int = 65_536) -> dict:
    """Per step and noise kind, on the demo: recall (share of that kind, among the samples the step
    decided, that it drops) and precision (share of the step's drops that are that kind). 'clean'
    recall is collateral loss. ``decisions``: decisions.parquet's path (read in batches of
    ``batch_rows``: counts are summed, nothing pool-wide is held) or a DataFrame."""
    kind_of = truth.set_index("uid")["kind"]
    cols = ["uid", "multiplicity"] + [f"keep:{lab}" for lab in labels]
    batches = ([decisions] if isinstance(decisions, pd.DataFrame) else
               (b.to_pandas() for b in pq.ParquetFile(decisions).iter_batches(batch_rows, columns=cols)))
    seen, dropped, kinds = {lab: Counter() for lab in labels + ["recipe"]}, {lab: Counter() for lab in labels + ["recipe"]}, set()
    for df in batches:
        kind = df["uid"].map(kind_of)
        kinds.update(kind.dropna().unique())
        for lab in labels + ["recipe"]:
            if lab == "recipe":
                s, d = np.ones(len(df), bool), (df.multiplicity == 0).to_numpy()
            else:    # with decide: survivors a step saw only what reached it (null verdicts elsewhere)
                v = df[f"keep:{lab}"]
                s, d = v.notna().to_numpy(), (v == False).to_numpy()   # noqa: E712 (nullable column)
            seen[lab].update(kind[s].value_counts().to_dict())
            dropped[lab].update(kind[d].value_counts().to_dict())
            dropped[lab]["*"] += int(d.sum())
    return {lab: {k: {"recall": dropped[lab][k] / max(1, seen[lab][k]),
                      "precision": dropped[lab][k] / dropped[lab]["*"] if dropped[lab]["*"] else 0.0}
                  for k in sorted(kinds)} for lab in labels + ["recipe"]}
