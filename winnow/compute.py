"""Executors for the per-shard map. Results come back in shard order whatever the executor, so
outputs are byte-identical on every one. A distributed engine (Ray/Dask via Prefect task runners)
plugs in here for pools that outgrow one machine."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

EXECUTORS = ("serial", "threads", "processes")


def map_shards(fn: Callable, arglist: Iterable[tuple], executor: str = "serial", workers: int = 1) -> Iterator:
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor '{executor}' (valid: {', '.join(EXECUTORS)})")
    arglist = list(arglist)
    if executor == "serial" or workers <= 1:
        for args in arglist:
            yield fn(*args)
        return
    pool_cls = ThreadPoolExecutor if executor == "threads" else ProcessPoolExecutor
    with pool_cls(max_workers=workers) as ex:
        # bounded look-ahead keeps memory at ~workers shards
        futures = [ex.submit(fn, *a) for a in arglist[:workers]]
        nxt = workers
        while futures:
            res = futures.pop(0).result()
            if nxt < len(arglist):
                futures.append(ex.submit(fn, *arglist[nxt]))
                nxt += 1
            yield res
