"""One thin entry point per DVC stage: read params, call winnow, gate, log."""
import winnow  # noqa: F401  first: its import pins torch's CPU kernels (winnow.kernels) before a stage imports torch
