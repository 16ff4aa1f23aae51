"""Great Expectations gates. A stage checks its outputs (and, for an external pool, its inputs) as
pandas frames against expectation lists; results go to ``reports/validation/<stage>.json``; any
failure raises GateError naming the rule, the count and example rows, so nothing downstream runs.

State stays bounded at any pool size: results keep counts and at most ``EXAMPLES`` example rows,
and a pool-sized table is checked as a stream of frames (one per shard, ``Gate.check_stream``)
whose counts are summed, never as one DataFrame.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Iterable

import pandas as pd

from winnow.errors import WinnowError
from winnow.io import write_json

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

EXAMPLES = 5   # example rows kept per rule
# Column-map expectations whose verdict on a row depends on other rows of the frame: per-frame
# results would not add up to the whole table's. Cross-shard uniqueness needs its own bounded
# check (winnow.pool.checks spills uids to hash partitions and streams those, ``partitioned_by``).
CROSS_ROW = frozenset({
    "ExpectColumnValuesToBeUnique", "ExpectCompoundColumnsToBeUnique", "ExpectMulticolumnValuesToBeUnique",
    "ExpectColumnValuesToBeIncreasing", "ExpectColumnValuesToBeDecreasing",
    "ExpectColumnValueZScoresToBeLessThan", "ExpectColumnValuesToNotBeOutliers",
})


class GateError(WinnowError, RuntimeError):
    pass


def _jsonable(x):
    try:
        json.dumps(x)
        return x
    except TypeError:
        return str(x)


def _error(info: dict | None) -> str | None:
    """The exception message of a result, if it raised: GX puts it at the top of exception_info,
    or (a metric that could not be computed, e.g. a missing column) one level down per metric."""
    info = info or {}
    for x in [info, *(v for v in info.values() if isinstance(v, dict))]:
        if x.get("raised_exception"):
            return str(x.get("exception_message"))
    return None


def _key(cfg: dict) -> str:
    return cfg["type"] + json.dumps({k: v for k, v in cfg["kwargs"].items() if k != "batch_id"},
                                    sort_keys=True, default=str)


def _ids(df: pd.DataFrame, id_column: str | list[str] | None) -> list[str]:
    return [c for c in ([id_column] if isinstance(id_column, str) else id_column or []) if c in df.columns]


def _examples(d: dict, ids: list[str]) -> list:
    """A result's failing rows as {checked column(s), id column(s)}: GX returns the first EXAMPLES
    whole rows (``include_unexpected_rows``); a result without rows gives its values."""
    result = d.get("result") or {}
    if result.get("unexpected_rows") is None:
        return result.get("partial_unexpected_list") or []
    kw = d["expectation_config"]["kwargs"]
    keep = dict.fromkeys(c for c in (kw.get("column"), kw.get("column_A"), kw.get("column_B"),
                                     *(kw.get("column_list") or []), *ids) if c)
    return [{k: row.get(k) for k in keep} for row in result["unexpected_rows"]]


@dataclass
class Gate:
    stage: str
    report_dir: str = "reports/validation"
    checks: list[dict] = field(default_factory=list)
    _batches: object = field(default=None, init=False, repr=False, compare=False)

    def _validate(self, df: pd.DataFrame, suite, id_column) -> list[dict]:
        """GX results of one frame, in suite order, as dicts with their ``examples``. BASIC with
        ``include_unexpected_rows`` keeps EXAMPLES rows, vectorised (SUMMARY and COMPLETE build the
        index list of every failing row in Python first, then cut it). The ephemeral context and its
        dataframe batch definition are made once per Gate; suites are validated in memory, nothing
        is added to the context per call."""
        if self._batches is None:
            import great_expectations as gx
            from great_expectations.data_context.types.base import ProgressBarsConfig

            logging.getLogger("great_expectations").setLevel(logging.WARNING)
            # this module sets itself to INFO on import and then announces the temporary directory of
            # every ephemeral context ("Created temporary directory ... for ephemeral docs site"): expected, not news
            logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
            ctx = gx.get_context(mode="ephemeral")
            ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
            self._batches = (ctx.data_sources.add_pandas("pd").add_dataframe_asset("frame")
                             .add_batch_definition_whole_dataframe("whole"))
        fmt = {"result_format": "BASIC", "partial_unexpected_count": EXAMPLES, "include_unexpected_rows": True}
        res = self._batches.get_batch(batch_parameters={"dataframe": df}).validate(suite, result_format=fmt)
        ids, by_key = _ids(df, id_column), {}
        for r in res.results:
            d = r.to_json_dict()
            d["examples"] = _examples(d, ids)
            by_key.setdefault(_key(d["expectation_config"]), []).append(d)
        return [by_key[_key(e.configuration.to_json_dict())].pop(0) for e in suite.expectations]

    @staticmethod
    def _suite(name: str, expectations: list):
        import great_expectations as gx

        return gx.ExpectationSuite(name=name, expectations=list(expectations))

    def check(self, name: str, df: pd.DataFrame, expectations: list, id_column: str | list[str] | None = "uid") -> None:
        """Validate ``df`` (named ``name`` in messages) against GE expectation objects; ``id_column``
        names the column(s) shown with each failing example row. For small frames (one row per
        shard, per task …): any expectation, aggregates included."""
        for d in self._validate(df, self._suite(f"{self.stage}.{name}", expectations), id_column):
            result = d.get("result") or {}
            entry = self._entry(name, d["expectation_config"], result.get("element_count", len(df)), result.get("unexpected_count"),
                                bool(d["success"]), d["examples"])
            entry["observed"] = _jsonable(result.get("observed_value"))
            entry["details"] = _jsonable(result.get("details"))
            if err := _error(d.get("exception_info")):
                entry["error"] = err
            self.checks.append(entry)

    def check_stream(self, name: str, frames: Iterable[pd.DataFrame], expectations: list,
                     id_column: str | list[str] | None = "uid", partitioned_by: str | None = None) -> None:
        """Validate a table given as ``frames`` (one per shard, or chunks; each frame is validated and
        dropped) against column-map expectations: counts are summed over frames and success is
        GX's rule on the sums (the expected share of non-missing rows is >= ``mostly``); one report
        entry per rule, as ``check`` makes, with at most EXAMPLES example rows overall.

        An expectation whose verdict needs the whole table (an aggregate: distinct values, a mean,
        a row count; or a cross-row one: uniqueness, monotonicity) is refused before any frame is
        read. ``partitioned_by``: every value of this column has all its rows in one frame (hash
        partitions), so uniqueness of it is a per-frame property and is accepted."""
        from great_expectations.expectations.expectation import (ColumnMapExpectation, ColumnPairMapExpectation,
                                                                 MulticolumnMapExpectation)

        for e in expectations:
            kind = type(e).__name__
            per_row = isinstance(e, (ColumnMapExpectation, ColumnPairMapExpectation, MulticolumnMapExpectation))
            partitioned = kind == "ExpectColumnValuesToBeUnique" and e.column == partitioned_by
            if not per_row or (kind in CROSS_ROW and not partitioned):
                raise ValueError(
                    f"gate '{self.stage}': {kind} on '{name}' cannot be checked frame by frame (it needs the "
                    f"whole table): check_stream takes column-map expectations only; check a small summary "
                    f"frame with check(), and uniqueness across frames with a bounded check of its own "
                    f"(hash partitions streamed with partitioned_by=)")
        suite = self._suite(f"{self.stage}.{name}", expectations)
        acc = [{"element_count": 0, "unexpected_count": None, "missing_count": 0, "examples": [], "details": None,
                "error": None} for _ in expectations]
        for i, df in enumerate(frames):
            for a, d in zip(acc, self._validate(df, suite, id_column)):
                result = d.get("result") or {}
                a["element_count"] += result.get("element_count", len(df))
                a["missing_count"] += result.get("missing_count") or 0
                if result.get("unexpected_count") is not None:
                    a["unexpected_count"] = (a["unexpected_count"] or 0) + result["unexpected_count"]
                a["examples"] += d["examples"][:EXAMPLES - len(a["examples"])]
                a["details"] = a["details"] or result.get("details")
                if a["error"] is None and (err := _error(d.get("exception_info"))):
                    a["error"] = f"frame {i}: {err}"
        for e, a in zip(expectations, acc):
            considered = a["element_count"] - a["missing_count"]
            unexpected = a["unexpected_count"] or 0
            success = a["error"] is None and (considered == 0 or (considered - unexpected) / considered >= e.mostly)
            entry = self._entry(name, e.configuration.to_json_dict(), a["element_count"], a["unexpected_count"],
                                success, a["examples"])
            entry["observed"], entry["details"] = None, _jsonable(a["details"])
            if a["error"]:
                entry["error"] = a["error"]
            self.checks.append(entry)

    @staticmethod
    def _entry(name: str, cfg: dict, element_count, unexpected_count, success: bool, examples: list) -> dict:
        return {"frame": name, "rule": cfg["type"],
                "kwargs": {k: v for k, v in cfg["kwargs"].items() if k != "batch_id"}, "success": success,
                "element_count": element_count, "unexpected_count": unexpected_count,
                "examples": [_jsonable(x) for x in examples][:EXAMPLES]}

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
