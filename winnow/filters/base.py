"""The step interface and registry of the filter engine.

A step is a pydantic model: its fields are the recipe parameters, validated before any data is
read, and never changed afterwards. A step's ``verdict(batch)`` is a bool mask (keep/drop) or,
for steps that up-sample, integer multiplicities, vectorised over one shard. Global steps
(``is_global``) first see the pool and return what they learned — a *fitted* value (a threshold,
centroids, rows to drop) — which the engine hands back to ``verdict(batch, fitted)`` and
``explain(batch, fitted)`` and shows in the funnel through ``report(fitted)``. A global step
either implements ``fit(pool, alive) -> fitted`` (``alive(shard)`` is the mask of samples that
survived the earlier steps), or declares ``fit_passes`` and implements a map-reduce:
``fit_begin(pool) -> state``, then per pass ``fit_shard(batch, alive, pass_no, state)`` on the
executor and ``fit_reduce(parts, pass_no, state) -> state`` in the driver; the last pass's state
is the fitted value. ``explain`` returns the scores a step decided on, recorded in
decisions.parquet.

A step that ``sets_copies`` sees the copies earlier steps made of each sample (retrieval's
up-sampling): its fit's ``alive`` is that int array (0: dropped), ``verdict(batch, fitted, copies)``
receives the copies of the rows it decides, and its int verdict is each sample's new number of
copies instead of a factor on them.
"""
from __future__ import annotations

import difflib
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from winnow.config import ParamsError, validate_model

REGISTRY: dict[str, type["Step"]] = {}


class Step(BaseModel):
    # no NaN or infinity in a step's numbers: a comparison with NaN is always false, so a threshold of
    # .nan would keep nothing without a word
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: ClassVar[str]              # registry name used in recipes (`step: <kind>`)
    is_global: ClassVar[bool] = False
    sets_copies: ClassVar[bool] = False   # verdict: each sample's number of copies, given the earlier ones
    name: str | None = None          # label in the funnel; defaults to the kind

    def label(self) -> str:
        return self.name or self.kind

    def leaves(self) -> list["Step"]:
        """The steps that decide: this one, or a group's (any_of) steps."""
        return [self]

    def requires(self) -> tuple[list[str], list[str]]:
        """(metadata/score columns, embedding keys) this step reads — checked before any work."""
        return [], []

    def files(self) -> list[str]:
        """Input files the step reads besides the pool (their content keys the filter's work)."""
        return []

    def needs_fit(self) -> bool:
        return self.is_global

    def fit(self, pool, alive):
        """Global steps without ``fit_passes``: the fitted value, computed over the pool one shard at
        a time; ``alive(shard)`` is the bool mask of that shard's samples kept by the steps before."""

    fit_passes: ClassVar[int] = 0    # > 0: fit is fit_shard mapped over shards + fit_reduce, this many times

    def fit_begin(self, pool):
        """Driver-side set-up before a map-reduce fit's first pass: the initial state."""

    def fit_shard(self, batch, alive: np.ndarray, pass_no: int, state):
        """One shard's part of a map-reduce fit (small: counts, a histogram), computed on a worker."""
        raise NotImplementedError

    def fit_reduce(self, parts, pass_no: int, state):
        """Combine the shards' parts (an iterator, in shard order) into the next state."""
        raise NotImplementedError

    def explain(self, batch, fitted=None) -> dict[str, np.ndarray]:
        """Per-sample scores this step decided on (recorded in decisions.parquet)."""
        return {}

    def verdict(self, batch, fitted=None) -> np.ndarray:
        raise NotImplementedError

    def report(self, fitted) -> dict:
        """What the fit learned, for the funnel."""
        return {}


def register(cls: type[Step]) -> type[Step]:
    REGISTRY[cls.kind] = cls
    return cls


def build_step(spec: dict, where: str) -> Step:
    spec = dict(spec or {})
    kind = spec.pop("step", None)
    if kind not in REGISTRY:
        near = difflib.get_close_matches(str(kind), REGISTRY, n=1)
        hint = f" did you mean '{near[0]}'?" if near else ""
        raise ParamsError(f"{where}: unknown step '{kind}'.{hint} Valid steps: {', '.join(sorted(REGISTRY))}")
    return validate_model(REGISTRY[kind], spec, f"{where} (step '{kind}')")
