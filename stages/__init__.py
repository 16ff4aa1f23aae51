"""One thin entry point per DVC stage: read params, call winnow, gate, log."""
