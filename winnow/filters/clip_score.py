"""Cross-modal steps: CLIP score by threshold or by top fraction of the whole pool."""
from __future__ import annotations

import numpy as np
from pydantic import model_validator

from winnow.filters.base import Step, register


def top_fraction_threshold(scores: np.ndarray, fraction: float) -> float:
    """DataComp's rule: the score at rank int(N*f) in descending order; samples >= it are kept."""
    s = np.sort(scores[np.isfinite(scores)])[::-1]
    if not len(s):
        raise ValueError("no finite scores to take a top fraction of")
    return float(s[min(int(len(s) * fraction), len(s) - 1)])


@register
class ClipScore(Step):
    """Keep samples whose image-text similarity is high.

    The score is a column (``clip_b32_similarity_score``, ``clip_l14_similarity_score``, or one the
    embed stage wrote, e.g. ``scorer_score`` / ``scorer_flip_score``) or the cosine of an
    ``[image_key, text_key]`` embedding pair. Either ``threshold`` or ``fraction`` (top fraction of
    the whole pool, exact, DataComp's rule). Samples with no finite score are dropped.
    """
    kind = "clip_score"
    score: str | None = None
    embeddings: tuple[str, str] | None = None
    threshold: float | None = None
    fraction: float | None = None

    @model_validator(mode="after")
    def _one_of_each(self):
        if (self.score is None) == (self.embeddings is None):
            raise ValueError("give exactly one of 'score' (a column) or 'embeddings' ([image_key, text_key])")
        if (self.threshold is None) == (self.fraction is None):
            raise ValueError("give exactly one of 'threshold' or 'fraction'")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError("'fraction' must be in (0, 1]")
        return self

    def requires(self):
        return ([self.score], []) if self.score else ([], list(self.embeddings))

    def scores(self, batch) -> np.ndarray:
        if self.score:
            return batch.column(self.score).astype(np.float32)
        img, txt = (batch.embedding(k) for k in self.embeddings)
        return np.einsum("nd,nd->n", img, txt)

    def fit(self, pool) -> None:
        if self.fraction is not None:
            allscores = np.concatenate([self.scores(pool.batch(s)) for s in pool.shards])
            self.threshold = top_fraction_threshold(allscores, self.fraction)

    def keep(self, batch) -> np.ndarray:
        s = self.scores(batch)
        return np.isfinite(s) & (s >= self.threshold)

    def state(self) -> dict:
        return {"threshold": self.threshold}
