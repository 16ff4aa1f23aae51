"""Great Expectations gates. A stage checks its outputs (and, for an external pool, its inputs) as
pandas frames against expectation lists; results go to ``reports/validation/<stage>.json``; any
failure raises GateError naming the rule, the count and example rows, so nothing downstream runs.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import pandas as pd

from winnow.errors import WinnowError
from winnow.io import write_json

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


class GateError(WinnowError, RuntimeError):
    pass


def _jsonable(x):
    try:
        json.dumps(x)
        return x
    except TypeError:
        return str(x)


@dataclass
class Gate:
    stage: str
    report_dir: str = "reports/validation"
    checks: list[dict] = field(default_factory=list)

    def check(self, name: str, df: pd.DataFrame, expectations: list, id_column: str | list[str] | None = "uid") -> None:
        """Validate ``df`` (named ``name`` in messages) against GE expectation objects; ``id_column``
        names the column(s) shown with each failing example row."""
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        logging.getLogger("great_expectations").setLevel(logging.WARNING)

        ctx = gx.get_context(mode="ephemeral")
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        bd = (ctx.data_sources.add_pandas("pd").add_dataframe_asset(name)
              .add_batch_definition_whole_dataframe("whole"))
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"{self.stage}.{name}"))
        for e in expectations:
            suite.add_expectation(e)
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{self.stage}.{name}", data=bd, suite=suite))
        fmt = {"result_format": "COMPLETE"}
        ids = [c for c in ([id_column] if isinstance(id_column, str) else id_column or []) if c in df.columns]
        if ids:
            fmt["unexpected_index_column_names"] = ids
        res = vd.run(batch_parameters={"dataframe": df}, result_format=fmt)
        for r in res.results:
            d = r.to_json_dict()
            cfg = d["expectation_config"]
            kwargs = {k: v for k, v in cfg["kwargs"].items() if k != "batch_id"}
            result = d.get("result") or {}
            exc = (d.get("exception_info") or {})
            entry = {
                "frame": name, "rule": cfg["type"], "kwargs": kwargs, "success": bool(d["success"]),
                "element_count": result.get("element_count", len(df)),
                "unexpected_count": result.get("unexpected_count"),
                "examples": [_jsonable(x) for x in (result.get("unexpected_index_list")
                                                    or result.get("partial_unexpected_list") or [])][:5],
                "observed": _jsonable(result.get("observed_value")),
                "details": _jsonable(result.get("details")),
            }
            if exc.get("raised_exception"):
                entry["error"] = str(exc.get("exception_message"))
            self.checks.append(entry)

    def failures(self) -> list[dict]:
        return [c for c in self.checks if not c["success"]]

    def message(self) -> str:
        lines = [f"gate '{self.stage}' failed ({len(self.failures())} of {len(self.checks)} rules):"]
        for f in self.failures():
            args = ", ".join(f"{k}={v}" for k, v in f["kwargs"].items())
            what = (f"{f['unexpected_count']} of {f['element_count']} rows fail"
                    if f["unexpected_count"] is not None else f"observed {f['observed']}")
            if f.get("error"):
                what = f"could not be checked: {f['error']}"
            lines.append(f"  - rule {f['rule']}({args}) on '{f['frame']}': {what}")
            if f["examples"]:
                lines.append(f"    e.g. {f['examples'][:3]}")
            if f["details"]:
                lines.append(f"    details: {f['details']}")
        return "\n".join(lines)

    def finish(self) -> dict:
        """Write the validation report; raise GateError if any rule failed."""
        summary = {"stage": self.stage, "success": not self.failures(), "rules": len(self.checks),
                   "failed": len(self.failures()), "checks": self.checks}
        write_json(f"{self.report_dir}/{self.stage}.json", summary)
        if self.failures():
            raise GateError(self.message())
        return summary


def expect():
    """The GE expectations namespace (imported lazily: GE costs ~2.5 s to import)."""
    import great_expectations as gx

    return gx.expectations
