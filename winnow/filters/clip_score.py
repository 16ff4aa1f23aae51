"""Cross-modal steps: CLIP score by threshold or by top fraction of the whole pool."""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from winnow.filters.base import Step, register


def top_fraction_threshold(scores: np.ndarray, fraction: float) -> float:
    """DataComp's rule: the score at rank int(N*f) in descending order; samples >= it are kept.
    (Reference form, the whole array in memory; the engine computes the same value in two passes
    over the shards with :class:`TopFractionSelect`.)"""
    s = np.sort(scores[np.isfinite(scores)])[::-1]
    if not len(s):
        return NOTHING
    return float(s[min(int(len(s) * fraction), len(s) - 1)])


# The cut of a top fraction that nothing reached (every earlier step dropped all, or no score is
# finite): NaN, against which every comparison is false, so the step keeps nothing, as the other
# steps do on an empty input, instead of failing the run (an empty branch of an any_of included).
NOTHING = float("nan")


def order_keys(scores: np.ndarray) -> np.ndarray:
    """float32 -> uint32 keys that sort like the floats (sign bit flipped for positives, all bits for
    negatives), so an exact order statistic is two 16-bit radix histograms."""
    b = np.ascontiguousarray(scores, dtype=np.float32).view(np.uint32)
    return np.where(b >> 31 == 1, ~b, b | np.uint32(0x80000000))


def key_to_float(key: int) -> float:
    b = np.uint32(key ^ 0x80000000) if key >> 31 else np.uint32(~np.uint32(key))
    return float(np.array([b], np.uint32).view(np.float32)[0])


class TopFractionSelect:
    """Exact DataComp top-fraction threshold over a pool too large to hold: pass 0 histograms the
    high 16 bits of every finite score's key, which locates the bucket holding rank int(N*f) (in
    descending order); pass 1 histograms the low 16 bits inside that bucket, which pins the key.
    A shard's part is at most 65,536 (bin, count) pairs and the driver holds one 65,536-bin
    histogram: nothing grows with the pool."""

    def __init__(self, fraction: float):
        self.fraction = fraction
        self.bucket = self.rank = None

    def part(self, scores: np.ndarray, pass_no: int) -> tuple[np.ndarray, np.ndarray]:
        """The shard's histogram, sparse: (bins present, their counts)."""
        k = order_keys(scores[np.isfinite(scores)])
        digits = k >> 16 if pass_no == 0 else k[(k >> 16) == self.bucket] & 0xFFFF
        return np.unique(digits, return_counts=True)

    def reduce(self, parts, pass_no: int) -> float | None:
        hist = np.zeros(1 << 16, np.int64)
        for bins, counts in parts:
            hist[bins] += counts        # a part's bins are unique (np.unique): no repeated index to add twice
        cum = np.cumsum(hist)
        if pass_no == 0:
            n = int(cum[-1])
            if not n:
                self.bucket = self.rank = -1
                return None
            target = n - 1 - min(int(n * self.fraction), n - 1)       # its index in ascending order
            self.bucket = int(np.searchsorted(cum, target, side="right"))
            self.rank = target - (int(cum[self.bucket - 1]) if self.bucket else 0)
            return None
        if self.bucket == -1:
            return NOTHING
        low = int(np.searchsorted(cum, self.rank, side="right"))
        return key_to_float((self.bucket << 16) | low)



def _cosine(batch, img: str, txt: str) -> np.ndarray:
    """Row-wise cosine of two unit embedding arrays; arrays that do not pair up are a ShardError."""
    from winnow.pool.shards import ShardError

    a, b = batch.embedding(img), batch.embedding(txt)
    if a.ndim != 2 or a.shape != b.shape:
        raise ShardError(f"shard {batch.shard}: embeddings '{img}' {a.shape} and '{txt}' {b.shape} do not pair up")
    return np.einsum("nd,nd->n", a, b)

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
        if self.score:    # read once per run: the fit's two passes and the verdict read it back
            return batch.cached(f"col.{self.score}", lambda shard: shard.column(self.score).astype(np.float32))
        img, txt = self.embeddings
        # cosine of the pair, computed once per shard and run (every pass reads it back)
        return batch.cached(f"cos.{img}.{txt}", lambda shard: _cosine(shard, img, txt))

    def needs_fit(self) -> bool:
        return self.fraction is not None

    fit_passes = 2      # exact top-fraction threshold: two map-reduce passes (TopFractionSelect)

    def fit_begin(self, pool) -> TopFractionSelect:
        return TopFractionSelect(self.fraction)     # travels to the workers with the step

    def fit_shard(self, batch, alive: np.ndarray, pass_no: int, state: TopFractionSelect):
        s = self.scores(batch)
        return state.part(s[alive] if self.over == "survivors" else s, pass_no)

    def fit_reduce(self, parts, pass_no: int, state: TopFractionSelect):
        t = state.reduce(parts, pass_no)
        return state if pass_no == 0 else t     # fitted: the threshold

    def verdict(self, batch, fitted: float | None = None) -> np.ndarray:
        s = self.scores(batch)
        return np.isfinite(s) & (s >= (self.threshold if fitted is None else fitted))

    def explain(self, batch, fitted=None) -> dict:
        return {"score": self.scores(batch)}

    def report(self, fitted) -> dict:
        return {"threshold": self.threshold if fitted is None else _reported(fitted)}


@register
class FlipScore(Step):
    """The seed paper's scene-text rule: a caption that only parrots text painted in the image
    matches the image but not its horizontal mirror, whose text no longer reads.

    ``mode``: ``drop`` keeps samples whose score falls by at most ``max_drop`` when the image is
    flipped — or, with ``max_drop_quantile: q``, by at most the q-quantile of the drops of the
    samples it decides (exact, two histogram passes like the top-fraction rule: the value at
    descending rank int(N(1-q)), so about the (1-q) largest drops go) — or, with
    ``max_drop_mirror: r``, by at most the rise that a share r of them exceed. Only a pair without
    text rises on flipping, and its drops are the mirror of its rises, so that rule is relative
    to clean pairs' drops: it takes out the text pairs however many there are (a quantile of all
    drops takes out 1-q of them, no more), while about r of the samples decided go as clean pairs
    (a share r / clean share of the clean ones: keep r small where text pairs are many). It
    assumes that mirroring does not move a textless pair's score on average; ``flipped`` keeps
    flipped-image score >= ``threshold``; ``min`` keeps min(score, flipped score) >= ``threshold``
    — or, with ``fraction``, the top fraction of the samples it decides by that score (the CLIP
    cut taken on what the pair still shares once the text no longer reads). The quantile and
    fraction forms are rules in the scorer's own units: they read the same on the demo scorer and
    on OpenAI CLIP cosines."""
    kind = "flip_score"
    score: str = "scorer_score"
    flip_score: str = "scorer_flip_score"
    mode: Literal["drop", "flipped", "min"] = "drop"
    threshold: float | None = None
    fraction: float | None = Field(None, gt=0, le=1)
    max_drop: float | None = None
    max_drop_quantile: float | None = Field(None, gt=0, le=1)
    max_drop_mirror: float | None = Field(None, gt=0, lt=0.5)

    @model_validator(mode="after")
    def _params_for_mode(self):
        drops = [self.max_drop, self.max_drop_quantile, self.max_drop_mirror]
        if self.mode == "drop":
            if sum(d is not None for d in drops) != 1:
                raise ValueError("mode 'drop' needs exactly one of 'max_drop', 'max_drop_quantile' or 'max_drop_mirror'")
            if self.threshold is not None or self.fraction is not None:
                raise ValueError("mode 'drop' takes a max drop, not 'threshold' or 'fraction'")
        else:
            if (self.threshold is None) == (self.fraction is None):
                raise ValueError(f"mode '{self.mode}' needs exactly one of 'threshold' or 'fraction'")
            if any(d is not None for d in drops):
                raise ValueError(f"mode '{self.mode}' takes 'threshold' or 'fraction', not a max drop")
        return self

    def requires(self):
        return [self.score, self.flip_score], []

    def needs_fit(self) -> bool:
        return self.max_drop_quantile is not None or self.max_drop_mirror is not None or self.fraction is not None

    fit_passes = 2      # an exact quantile / top fraction (TopFractionSelect)

    def _values(self, s: np.ndarray, f: np.ndarray) -> np.ndarray:
        """What the rule compares: the drop, the flipped score or the smaller of the two."""
        return s - f if self.mode == "drop" else f if self.mode == "flipped" else np.minimum(s, f)

    def fit_begin(self, pool) -> TopFractionSelect:
        if self.max_drop_mirror is not None:
            return TopFractionSelect(self.max_drop_mirror)      # over the rises (flipped - score)
        return TopFractionSelect(1.0 - self.max_drop_quantile if self.mode == "drop" else self.fraction)

    def fit_shard(self, batch, alive: np.ndarray, pass_no: int, state: TopFractionSelect):
        v = self._values(*self.explain(batch).values())[alive]
        return state.part(-v if self.max_drop_mirror is not None else v, pass_no)     # non-finite values are left out there

    def fit_reduce(self, parts, pass_no: int, state: TopFractionSelect):
        t = state.reduce(parts, pass_no)
        return state if pass_no == 0 else t     # fitted: the largest drop kept, or the lowest score

    def report(self, fitted) -> dict:
        if not self.needs_fit():
            return {}
        return {"max_drop": _reported(fitted)} if self.mode == "drop" else {"threshold": _reported(fitted)}

    def explain(self, batch, fitted=None) -> dict:
        return {"score": batch.column(self.score).astype(np.float32),
                "flip_score": batch.column(self.flip_score).astype(np.float32)}

    def verdict(self, batch, fitted=None) -> np.ndarray:
        s, f = self.explain(batch).values()
        v = self._values(s, f)
        if self.mode == "drop":
            ok = v <= (fitted if self.needs_fit() else self.max_drop)
        else:
            ok = v >= (fitted if self.needs_fit() else self.threshold)
        return np.isfinite(s) & np.isfinite(f) & ok


def _reported(cut: float) -> float | None:
    return None if cut != cut else cut     # NOTHING (NaN) is not a number JSON readers take
