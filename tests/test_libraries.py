import numpy as np
import pytest

from winnow.scorer_quality import roc_auc


@pytest.mark.parametrize("pos, neg, expected", [
    # P(pos > neg) + P(pos == neg) / 2 over all pairs, counted by hand (the values the earlier
    # hand-written Mann-Whitney implementation gave)
    ([1, 2, 2, 3], [2, 2, 0], 8 / 12),
    ([0, 1, 1, 4], [1, 1, 1, 2, 5], 7 / 20),
    ([0.5, 0.5, 0.5], [0.1, 0.5, 0.9], 4.5 / 9),
    ([1, 1], [1], 0.5),
    ([2, 2], [2, 2, 2], 0.5),
    ([3, 4], [1, 2], 1.0),
])
def test_roc_auc_counts_ties_half(pos, neg, expected):
    assert roc_auc(np.array(pos, dtype=float), np.array(neg, dtype=float)) == pytest.approx(expected, abs=1e-12)
