"""The sweep table: statistics over seeds and the 'beats no_filter beyond the seed spread' verdict."""
import pytest

from winnow.sweep import table


def _row(recipe, seed, avg, img):
    return {"recipe": recipe, "seed": seed, "average": avg, "groups": {"ImageNet": img}, "missing": [],
            "samples_seen": 16000, "subset_size": 1000 if recipe != "no_filter" else 4000, "kept_unique": 1}


def test_table_statistics_and_verdict():
    rows = [_row("no_filter", s, a, a) for s, a in enumerate([0.10, 0.12, 0.11])]
    rows += [_row("good", s, a, a) for s, a in enumerate([0.15, 0.14, 0.16])]
    rows += [_row("overlap", s, a, a) for s, a in enumerate([0.13, 0.115, 0.14])]
    text, stats = table(rows)
    assert stats["good"]["average"]["mean"] == pytest.approx(0.15)
    assert stats["good"]["average"]["std"] == pytest.approx(0.01)
    assert stats["good"]["delta_vs_baseline"] == pytest.approx(0.04)
    assert stats["good"]["beats_baseline_beyond_spread"] is True
    assert stats["good"]["beats_baseline_beyond_std"] is True
    assert stats["overlap"]["beats_baseline_beyond_spread"] is False      # 0.115 < no_filter's best 0.12
    assert stats["overlap"]["beats_baseline_beyond_std"] is True          # Δ 0.018 > std 0.0126
    assert "beats_baseline_beyond_spread" not in stats["no_filter"]
    assert "| good | 1000 | 16000 | 3 | 0.150 ± 0.010 (0.140–0.160) |" in text
