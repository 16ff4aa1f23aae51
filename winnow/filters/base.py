"""The step interface and registry of the filter engine.

A step is a pydantic model (its fields are the recipe parameters, validated before any data is
read). Per-sample steps implement ``keep(batch) -> bool mask`` vectorised over one shard. Global
steps first see the whole pool in ``fit(pool)`` (e.g. an exact top-fraction threshold), which
keeps only small global state, then decide per shard like any other step. Steps that up-sample
return integer multiplicities instead of a bool mask.
"""
from __future__ import annotations

import difflib
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from winnow.config import ParamsError, validate_model

REGISTRY: dict[str, type["Step"]] = {}


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: ClassVar[str]              # registry name used in recipes (`step: <kind>`)
    name: str | None = None          # label in the funnel; defaults to the kind

    def label(self) -> str:
        return self.name or self.kind

    def requires(self) -> tuple[list[str], list[str]]:
        """(metadata/score columns, embedding keys) this step reads — checked before any work."""
        return [], []

    def fit(self, pool) -> None:
        """Global steps: compute state over the whole pool (one shard at a time)."""

    def keep(self, batch) -> np.ndarray:
        raise NotImplementedError

    def state(self) -> dict:
        """What ``fit`` learned, for the funnel report."""
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
