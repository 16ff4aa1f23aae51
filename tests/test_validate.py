import json

import pandas as pd
import pytest

from winnow.validate import Gate, GateError, expect


def test_gate_names_rule_count_and_examples(tmp_path):
    E = expect()
    df = pd.DataFrame({"uid": ["a" * 32, "b" * 32, "b" * 32], "x": [0.1, 2.0, 0.2]})
    g = Gate("demo", report_dir=str(tmp_path))
    g.check("samples", df, [E.ExpectColumnValuesToBeUnique(column="uid"),
                            E.ExpectColumnValuesToBeBetween(column="x", min_value=0, max_value=1)])
    with pytest.raises(GateError) as e:
        g.finish()
    msg = str(e.value)
    assert "expect_column_values_to_be_unique" in msg and "2 of 3 rows fail" in msg and "b" * 32 in msg
    assert "expect_column_values_to_be_between" in msg and "1 of 3 rows fail" in msg
    report = json.loads((tmp_path / "demo.json").read_text())
    assert report["success"] is False and report["failed"] == 2


def test_gate_passes_and_writes_report(tmp_path):
    g = Gate("ok", report_dir=str(tmp_path))
    g.check("t", pd.DataFrame({"uid": ["a"]}), [expect().ExpectColumnValuesToNotBeNull(column="uid")])
    assert g.finish()["success"]
    assert json.loads((tmp_path / "ok.json").read_text())["rules"] == 1
