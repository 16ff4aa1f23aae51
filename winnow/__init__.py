"""winnow: declarative, reproducible curation of image-text pre-training data (DataComp format)."""
import os as _os

# Offline by design: a pretrained tag that is not cached must fail at once, not hang on the hub.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
_os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from winnow.kernels import pin_cpu_isa as _pin_cpu_isa

_pin_cpu_isa()   # before any stage loads torch: the same kernels, so the same bytes, on every x86 machine

__version__ = "0.1.0"
