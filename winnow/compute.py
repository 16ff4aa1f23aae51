"""Executors for the per-shard map. Results come back in shard order whatever the executor, so
outputs are byte-identical on every one.

- ``serial``, ``threads``, ``processes``: this machine;
- ``dask``: a real distributed engine. ``address`` names a running ``dask.distributed`` scheduler
  (``tcp://host:8786``) whose workers can read the pool's URIs; without one, a local multi-process
  cluster of ``workers`` processes is started once per process.

Submission is windowed (``2 x workers`` shards in flight), so memory stays at a few shards.
"""
from __future__ import annotations

import atexit
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

EXECUTORS = ("serial", "threads", "processes", "dask")


_CLIENTS: dict = {}


def dask_client(address: str | None, workers: int):
    """One client per (address, workers) for the life of a run; see :func:`release`."""
    from distributed import Client, LocalCluster

    key = (address, workers)
    if key not in _CLIENTS:
        cluster = None if address else LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                    dashboard_address=None, host="127.0.0.1")
        _CLIENTS[key] = (Client(address or cluster), cluster)
    return _CLIENTS[key][0]


def release() -> None:
    """Close the clients (and local clusters) this process opened; a remote cluster keeps running."""
    while _CLIENTS:
        client, cluster = _CLIENTS.popitem()[1]
        client.close()
        if cluster is not None:
            cluster.close()


atexit.register(release)


def _windowed(submit: Callable, arglist: list[tuple], window: int) -> Iterator:
    futures = [submit(a) for a in arglist[:window]]
    nxt = len(futures)
    while futures:
        res = futures.pop(0).result()
        if nxt < len(arglist):
            futures.append(submit(arglist[nxt]))
            nxt += 1
        yield res


def map_shards(fn: Callable, arglist: Iterable[tuple], executor: str = "serial", workers: int = 1,
               address: str | None = None) -> Iterator:
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor '{executor}' (valid: {', '.join(EXECUTORS)})")
    arglist = list(arglist)
    if executor == "dask":
        client = dask_client(address, max(1, workers))
        yield from _windowed(lambda a: client.submit(fn, *a, pure=False), arglist, 2 * max(1, workers))
        return
    if executor == "serial" or workers <= 1:
        for args in arglist:
            yield fn(*args)
        return
    pool_cls = ThreadPoolExecutor if executor == "threads" else ProcessPoolExecutor
    with pool_cls(max_workers=workers) as ex:
        yield from _windowed(lambda a: ex.submit(fn, *a), arglist, workers)
