"""Stage `report`: reports/index.md from every stage's outputs."""
from pathlib import Path

import pandas as pd

from winnow import track
from winnow.config import Params
from winnow.io import atomic_file
from winnow.report import build
from winnow.stage import main
from winnow.validate import Gate, expect

OUT = "reports/index.md"


def body(p: Params) -> dict:
    text = build()
    with atomic_file(OUT) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    gate = Gate("report")
    sections = ["## Funnel", "## Evaluation"]
    gate.check("sections", pd.DataFrame([{"section": s, "present": s in text} for s in sections]),
               [expect().ExpectColumnValuesToBeInSet(column="present", value_set=[True])], id_column="section")
    gate.finish()
    track.log_artifact(OUT)
    print(f"report: {Path(OUT).resolve()}")
    return {"report_bytes": len(text)}


if __name__ == "__main__":
    main("report", [], body)
