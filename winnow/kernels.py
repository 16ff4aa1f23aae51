"""One CPU instruction set for torch's kernels, on every x86 machine, so that training and scoring
on CPU give the same bytes wherever they run (the committed dvc.lock holds the demo scorer's hash).

torch picks its CPU kernels by the machine's best instruction set, in three libraries, and each
choice changes the rounding of sums (the vector width sets the order of the additions): ATen's own
kernels (``ATEN_CPU_CAPABILITY``), MKL's BLAS (``MKL_CBWR``, its conditional numerical
reproducibility mode) and oneDNN's convolutions (``ONEDNN_MAX_CPU_ISA``). Measured on the demo
scorer (an AVX-512 machine): each of the three alone changes the checkpoint's bytes. AVX2 is the
level every x86-64 machine of the last decade has, and costs nothing measurable against AVX-512
here (42 s vs 44 s for the micro scorer); the portable ``default`` level is 35% slower.

Each variable is set only where unset (a user may choose otherwise, e.g. AVX-512 for speed, and
give up cross-machine bytes). Nothing is set off x86 or where the CPU lacks AVX2 + FMA: those
machines run their own kernels and their bytes may differ. Read by each library at its first use,
so this runs when ``winnow`` is imported, before any stage touches torch."""
from __future__ import annotations

import os
import platform

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def _has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:     # not Linux: no cheap way to ask before torch loads; leave the libraries to choose
        return False
    return {"avx2", "fma"} <= set(flags)


def pin_cpu_isa(environ=os.environ) -> dict:
    """Set PINNED's variables that are unset (on x86 with AVX2 + FMA); returns what was set."""
    if not _has_avx2():
        return {}
    added = {k: v for k, v in PINNED.items() if k not in environ}
    environ.update(added)
    return added
