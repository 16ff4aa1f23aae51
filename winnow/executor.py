"""The executor: where a job's units run. Built once from params (``kind``, ``workers``,
``address``) and passed down; results come back in unit order whatever the kind, so outputs are
byte-identical on every one.

- ``serial``, ``threads``, ``processes``: this machine;
- ``dask``: a real distributed engine through Prefect's task runner (prefect-dask's
  ``DaskTaskRunner``). Each map (e.g. one pass of a filter run) is a Prefect flow run named by its
  job, and every unit a task run of it, named by the unit, retried once, visible in the Prefect UI. ``address`` names a running ``dask.distributed`` scheduler
  (``tcp://host:8786``) whose workers can read the pool's URIs and reach the same Prefect API
  (``PREFECT_API_URL``); without one, a local multi-process cluster of ``workers`` processes is
  started for the run.

Submission is windowed (``2 x workers`` units in flight), so memory stays at a few shards.

A worker of a cluster reached by ``address`` runs in its own working directory (another machine,
or a process started elsewhere): a relative path shipped to it would name another file there. So
with ``address`` every location in the arguments (and in a ``functools.partial``'s bound ones)
is made absolute in the driver first (:func:`absolute_locations`): ``Path`` values, and strings held by parameters or dataclass fields
named like a location (``*_dir``, ``*_path``, ``uri``, ``*_uri``, ``root``, ``scratch``, ``*_file(s)``,
and the values of mappings so named), in dataclasses and pydantic models (a recipe's steps) too;
``s3://`` URIs pass unchanged. The workers must see the same filesystem at those paths (README).
"""
from __future__ import annotations

import atexit
import dataclasses
import functools
import inspect
import os
import re
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

from pydantic import BaseModel

from winnow.config import ParamsError

EXECUTORS = ("serial", "threads", "processes", "dask")

_SERVER = None


def prefect_api() -> str:
    """The Prefect API that shard task runs report to: ``PREFECT_API_URL`` when set; otherwise one
    temporary local server for this process, exported in the environment so the workers of a local
    cluster (started after this) report to the same one."""
    global _SERVER
    from prefect.settings import PREFECT_API_URL

    if url := (os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()):
        return url
    from prefect.server.api.server import SubprocessASGIServer

    _SERVER = SubprocessASGIServer()
    _SERVER.start()
    atexit.register(_SERVER.stop)
    os.environ["PREFECT_API_URL"] = _SERVER.api_url
    return _SERVER.api_url


_LOCATION = re.compile(r"(^|_)(dirs?|paths?|uris?|roots?|scratch|files?)$")


def _absolute(s: str) -> str:
    if "://" in s and not s.startswith("file://"):
        return s                               # s3:// and the like name the same object everywhere
    if s.startswith("file://"):
        return "file://" + os.path.abspath(s.removeprefix("file://"))
    return os.path.abspath(s)


def absolute_locations(value: Any, name: str = "") -> Any:
    """``value`` with every local location made absolute against the driver's working directory:
    ``Path`` values always; strings when ``name`` (a parameter or field name) names a location;
    into tuples and lists, mappings named as locations, and dataclasses (by field name). Other
    values are unchanged."""
    if isinstance(value, os.PathLike):
        return type(value)(os.path.abspath(value))
    if isinstance(value, str):
        return _absolute(value) if value and _LOCATION.search(name) else value
    if isinstance(value, (list, tuple)):
        out = [absolute_locations(v, name) for v in value]
        return type(value)(out) if not hasattr(value, "_fields") else type(value)(*out)
    if isinstance(value, dict):
        # only a mapping named as locations (``target_files``: task -> file) holds locations; other
        # mappings (a pool's manifest, whose ``uri: .`` is relative to the pool) are data, unchanged
        return {k: absolute_locations(v, name) for k, v in value.items()} if _LOCATION.search(name) else value
    if isinstance(value, BaseModel):       # a recipe and its steps (e.g. a language step's ``lid_file``)
        changes = {}
        for name in type(value).model_fields:
            v = getattr(value, name)
            new = absolute_locations(v, name)
            if new is not v:
                changes[name] = new
        return value.model_copy(update=changes) if changes else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {}
        for f in dataclasses.fields(value):
            if not f.init:
                continue
            v = getattr(value, f.name)
            new = absolute_locations(v, f.name)
            if new is not v:
                changes[f.name] = new
        return dataclasses.replace(value, **changes) if changes else value
    return value


def _absolute_callable(fn: Callable) -> Callable:
    """A ``functools.partial`` (of partials) with the locations among its bound arguments made
    absolute: a job's map carries its pool and work directory that way."""
    if not isinstance(fn, functools.partial):
        return fn
    args = _absolute_args(fn.func, tuple(_absolute_callable(a) for a in fn.args))
    return functools.partial(_absolute_callable(fn.func), *args,
                             **{k: absolute_locations(v, k) for k, v in fn.keywords.items()})


def _absolute_args(fn: Callable, args: tuple) -> tuple:
    """Positional arguments of ``fn`` with their locations made absolute (by parameter name)."""
    try:
        names = [p.name for p in inspect.signature(fn).parameters.values()]
    except (TypeError, ValueError):
        names = []
    names += [""] * max(0, len(args) - len(names))
    return tuple(absolute_locations(a, n) for a, n in zip(args, names))


@functools.cache
def _unit_task(fn: Callable):
    from prefect import task
    from prefect.cache_policies import NONE

    params = inspect.signature(fn).parameters
    named = next((n for n in ("unit", "shard") if n in params), None)     # the task run's name in the UI
    return task(fn, name=getattr(fn, "__name__", "unit").strip("_"), task_run_name="{%s}" % named if named else None,
                retries=1, cache_policy=NONE, persist_result=False)


_INSTALLED: Callable | None = None


def _install(fn: Callable) -> None:
    global _INSTALLED
    _INSTALLED = fn


def _call_installed(*args):
    return _INSTALLED(*args)


def _windowed(submit: Callable, arglist: list[tuple], window: int) -> Iterator:
    futures = [submit(a) for a in arglist[:window]]
    nxt = len(futures)
    while futures:
        res = futures.pop(0).result()
        if nxt < len(arglist):
            futures.append(submit(arglist[nxt]))
            nxt += 1
        yield res


@dataclasses.dataclass(frozen=True)
class Executor:
    """``serial``, ``threads`` or ``processes`` on this machine (``workers`` of them), or ``dask``:
    one Prefect flow run per map, each unit a task run on a Dask cluster (the one at ``address``,
    or a local one of ``workers`` processes)."""
    kind: str = "serial"
    workers: int = 1
    address: str | None = None

    def __post_init__(self):
        if self.kind not in EXECUTORS:
            raise ParamsError(f"unknown executor '{self.kind}' (valid: {', '.join(EXECUTORS)})")

    @classmethod
    def of(cls, section) -> "Executor":
        """From a params section with ``executor``, ``workers`` and ``address`` fields."""
        return cls(section.executor, section.workers, section.address)

    def map(self, fn: Callable, arglist: Iterable[tuple], name: str = "winnow") -> Iterator:
        """``fn(*args)`` for each args, results in order; at most ``2 x workers`` in flight. On
        ``dask`` the map is one Prefect flow run called ``name`` whose task runner is a
        ``DaskTaskRunner`` (on the cluster at ``address``, or a local one), each unit a task run."""
        arglist = list(arglist)
        if self.kind == "dask":
            yield from self._dask_map(fn, arglist, name)
            return
        if self.kind == "serial" or self.workers <= 1:
            for args in arglist:
                yield fn(*args)
            return
        if self.kind == "threads":
            with ThreadPoolExecutor(max_workers=self.workers) as ex:
                yield from _windowed(lambda a: ex.submit(fn, *a), arglist, 2 * self.workers)
            return
        # the map's function (a partial carrying the pool, the recipe, fitted values) reaches each
        # worker once, at its start; a unit then travels as its arguments alone
        with ProcessPoolExecutor(max_workers=self.workers, initializer=_install, initargs=(fn,)) as ex:
            yield from _windowed(lambda a: ex.submit(_call_installed, *a), arglist, 2 * self.workers)

    def _dask_map(self, fn: Callable, arglist: list[tuple], name: str) -> list:
        from prefect import flow
        from prefect.settings import PREFECT_API_URL, temporary_settings
        from prefect_dask import DaskTaskRunner

        if self.address:       # the cluster's workers resolve relative paths in their own working directory
            fn = _absolute_callable(fn)
            arglist = [_absolute_args(fn, a) for a in arglist]
        url = prefect_api()
        runner = DaskTaskRunner(address=self.address) if self.address else DaskTaskRunner(cluster_kwargs={
            "n_workers": max(1, self.workers), "threads_per_worker": 1, "processes": True,
            "dashboard_address": None, "host": "127.0.0.1"})
        t = _unit_task(fn)

        @flow(name=re.sub(r"[/%&<>]", "-", name), task_runner=runner, persist_result=False, validate_parameters=False)
        def units():
            return list(_windowed(lambda a: t.submit(*a), arglist, 2 * max(1, self.workers)))

        with temporary_settings(updates={PREFECT_API_URL: url}):
            return units()


SERIAL = Executor()
