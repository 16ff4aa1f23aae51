"""The built-in demo world, apart from the library: the synthetic world (``world``), the demo pool
with its labelled noise and held-out pairs (``pool``), the demo evaluation suite (``tasks``) and the
truth metrics of a filter run against the noise labels (``truth``). Nothing outside stages and
tests imports it; winnow.pool is DataComp pool I/O only."""
