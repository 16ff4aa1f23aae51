"""Image steps decided from the metadata (``original_width``/``original_height``)."""
from __future__ import annotations

import numpy as np

from winnow.filters.base import Step, register


@register
class ImageSize(Step):
    """DataComp basic: min(original side) >= 200 and max/min aspect ratio <= 3.0."""
    kind = "image_size"
    min_side: int = 200
    max_aspect: float = 3.0

    def requires(self):
        return ["original_width", "original_height"], []

    def verdict(self, batch, fitted=None) -> np.ndarray:
        w = batch.column("original_width").astype(np.float64)
        h = batch.column("original_height").astype(np.float64)
        lo, hi = np.minimum(w, h), np.maximum(w, h)
        with np.errstate(divide="ignore", invalid="ignore"):
            aspect = np.where(lo > 0, hi / lo, np.inf)
        return (lo >= self.min_side) & (aspect <= self.max_aspect)


@register
class Downloaded(Step):
    """DataComp's download layout: keep samples whose image img2dataset downloaded. The engine puts
    it before the first step that reads pixels (embeddings or scores the embed stage computed from
    the images), so such a step sees only samples with an image and never keeps one without; it is
    the funnel's "not downloaded" line. Metadata steps never need it: DataComp's baselines decide on
    every metadata row, downloaded or not."""
    kind = "downloaded"

    def requires(self):
        return ["downloaded"], []

    def verdict(self, batch, fitted=None) -> np.ndarray:
        return batch.column("downloaded").astype(bool)
