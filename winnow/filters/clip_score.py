"""Cross-modal steps: CLIP score by threshold or by top fraction of the whole pool."""
from __future__ import annotations

from typing import Literal

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
    over: Literal["pool", "survivors"] = "pool"   # DataComp ranks the whole pool

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

    def needs_fit(self) -> bool:
        return self.fraction is not None

    def fit(self, pool, alive) -> None:
        if self.fraction is not None:
            parts = []
            for shard in pool.shards:
                s = self.scores(pool.batch(shard))
                parts.append(s[alive(shard)] if self.over == "survivors" else s)
            self.threshold = top_fraction_threshold(np.concatenate(parts), self.fraction)

    def keep(self, batch) -> np.ndarray:
        s = self.scores(batch)
        return np.isfinite(s) & (s >= self.threshold)

    def explain(self, batch) -> dict:
        return {"score": self.scores(batch)}

    def state(self) -> dict:
        return {"threshold": self.threshold}


@register
class FlipScore(Step):
    """The seed paper's scene-text rule: a caption that only parrots text painted in the image
    matches the image but not its horizontal mirror, whose text no longer reads.

    ``mode``: ``drop`` keeps samples whose score falls by at most ``max_drop`` when the image is
    flipped; ``flipped`` keeps flipped-image score >= ``threshold``; ``min`` keeps
    min(score, flipped score) >= ``threshold``."""
    kind = "flip_score"
    score: str = "scorer_score"
    flip_score: str = "scorer_flip_score"
    mode: Literal["drop", "flipped", "min"] = "drop"
    threshold: float | None = None
    max_drop: float | None = None

    @model_validator(mode="after")
    def _params_for_mode(self):
        if self.mode == "drop" and self.max_drop is None:
            raise ValueError("mode 'drop' needs 'max_drop'")
        if self.mode != "drop" and self.threshold is None:
            raise ValueError(f"mode '{self.mode}' needs 'threshold'")
        return self

    def requires(self):
        return [self.score, self.flip_score], []

    def explain(self, batch) -> dict:
        return {"score": batch.column(self.score).astype(np.float32),
                "flip_score": batch.column(self.flip_score).astype(np.float32)}

    def keep(self, batch) -> np.ndarray:
        s, f = self.explain(batch).values()
        if self.mode == "drop":
            ok = (s - f) <= self.max_drop
        elif self.mode == "flipped":
            ok = f >= self.threshold
        else:
            ok = np.minimum(s, f) >= self.threshold
        return np.isfinite(s) & np.isfinite(f) & ok
