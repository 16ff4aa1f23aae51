"""How well each filter step finds the demo's labelled noise (the pool's ``truth.parquet``)."""
from __future__ import annotations

import numpy as np
import pandas as pd


def truth_metrics(decisions: pd.DataFrame, truth: pd.DataFrame, labels: list[str]) -> dict:
    """Per step and noise kind, on the demo: recall (share of that kind, among the samples the step
    decided, that it drops) and precision (share of the step's drops that are that kind). 'clean'
    recall is collateral loss."""
    df = decisions.merge(truth[["uid", "kind"]], on="uid", how="left")
    kinds = sorted(df.kind.dropna().unique())
    out = {}
    for lab in labels + ["recipe"]:
        if lab == "recipe":
            seen, dropped = np.ones(len(df), bool), (df.multiplicity == 0).to_numpy()
        else:    # with decide: survivors a step saw only what reached it (null verdicts elsewhere)
            v = df[f"keep:{lab}"]
            seen, dropped = v.notna().to_numpy(), (v == False).to_numpy()   # noqa: E712 (nullable column)
        nd = int(dropped.sum())
        out[lab] = {k: {"recall": float((dropped & (df.kind == k)).sum() / max(1, (seen & (df.kind == k)).sum())),
                        "precision": float((dropped & (df.kind == k)).sum() / nd) if nd else 0.0}
                    for k in kinds}
    return out
