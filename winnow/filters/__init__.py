"""The filter engine's steps. Importing this package registers every step family."""
from winnow.filters import alignment, clip_score, dedup, image, subset, text, union  # noqa: F401  (registration side effect)
from winnow.filters.base import REGISTRY, Step, build_step, register  # noqa: F401
