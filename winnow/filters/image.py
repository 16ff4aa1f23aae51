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

    def keep(self, batch) -> np.ndarray:
        w = batch.column("original_width").astype(np.float64)
        h = batch.column("original_height").astype(np.float64)
        lo, hi = np.minimum(w, h), np.maximum(w, h)
        with np.errstate(divide="ignore", invalid="ignore"):
            aspect = np.where(lo > 0, hi / lo, np.inf)
        return (lo >= self.min_side) & (aspect <= self.max_aspect)
