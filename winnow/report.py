"""The run report (``reports/index.md``): funnel, per-step precision/recall against the demo's
truth, scorer quality, evaluation table and stage timings — all read from the stages' outputs."""
from __future__ import annotations

import json
from pathlib import Path


def _table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _read(path: str):
    p = Path(path)
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else None


def build(reports: str = "reports", scorer_dir: str = "models/scorer") -> str:
    funnel = _read(f"{reports}/filter/funnel.json") or {}
    summary = _read(f"{reports}/eval/summary.json") or {}
    quality = _read(f"{scorer_dir}/quality.json") or {}
    out = [f"# winnow run report — recipe `{funnel.get('recipe', '?')}`", ""]
    out += ["## Funnel", "",
            f"Pool: {funnel.get('pool_size')} samples → kept {funnel.get('kept_unique')} unique "
            f"({100 * funnel.get('kept_fraction', 0):.1f}%), subset with duplicates: {funnel.get('subset_size')}.", ""]
    out.append(_table(["step", "params", "kept after", "dropped here", "dropped standalone"],
                      [[s["step"], json.dumps({k: v for k, v in s["params"].items() if k != "name"} | s["state"]),
                        s["kept_after"], s["dropped_here"], s["dropped_standalone"]] for s in funnel.get("steps", [])]))
    truth = funnel.get("truth")
    if truth:
        kinds = sorted(next(iter(truth.values())).keys())
        out += ["", "## What each step removed, against the demo's ground truth", "",
                "Recall: share of each noise kind the step drops on its own (for `clean`: collateral loss). "
                "Precision: share of the step's drops that are of that kind.", ""]
        out.append(_table(["step"] + [f"{k} R / P" for k in kinds],
                          [[lab] + [f"{v[k]['recall']:.2f} / {v[k]['precision']:.2f}" for k in kinds]
                           for lab, v in truth.items()]))
    if quality:
        out += ["", "## Scoring CLIP (held-out demo pairs)", ""]
        out.append(_table(["measure", "value"], [[k, v] for k, v in quality.items()]))
    out += ["", "## Evaluation", ""]
    if summary:
        rows = [[k, v] for k, v in summary.get("tasks", {}).items()]
        rows += [[f"group: {g}", v] for g, v in summary.get("groups", {}).items()]
        rows.append(["**average**", summary.get("average")])
        out.append(_table(["task", "main metric"], rows))
        if summary.get("missing"):
            out += ["", f"Missing tasks (not scored): {', '.join(summary['missing'])}"]
    timings = sorted(Path(reports, "timings").glob("*.json"))
    if timings:
        out += ["", "## Stage wall time (last run of each stage)", ""]
        out.append(_table(["stage", "seconds"], [[t.stem, json.loads(t.read_text())["wall_s"]] for t in timings]))
    return "\n".join(out) + "\n"
