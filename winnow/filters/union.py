"""``any_of``: a union of branches, each a chain of steps, in a recipe that is otherwise a chain.

The recipe's steps are ANDed: a sample goes on only while every step keeps it. The seed paper's
stage 3 needs a union: retrieval *selects* task-relevant samples that the quality filters may have
dropped, rather than up-sampling what they kept. An ``any_of`` step keeps a sample when any branch
keeps it, with the most copies any branch gives it::

    - step: any_of
      name: quality_or_task
      branches:
        - name: quality
          steps: [{step: clip_score, ...}, {step: flip_score, ...}]
        - name: task
          steps: [{step: retrieval, mode: keep, ...}]     # from what reached the any_of
        - name: task_of_language
          from: language                                  # from a step's survivors in an earlier branch
          steps: [...]

A branch starts from the samples that reached the ``any_of`` (put it first to select from the
whole pool) or, with ``from: <label>``, from the survivors of a step of an earlier branch. Inside
a branch steps decide as a funnel does. The ``any_of`` is a global step: its fit fits its branches'
global steps in order, in the driver, one shard at a time (a branch step's survivors are
recomputed per shard, never held for the pool), and its fitted value is theirs by label.
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_serializer, field_validator, model_validator

from winnow.filters.base import Step, build_step, register


class Branch(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str
    start: str | None = Field(None, alias="from")   # a step label of an earlier branch; None: the any_of's input
    steps: list[SerializeAsAny[Step]] = Field(min_length=1)

    @field_validator("steps", mode="before")
    @classmethod
    def _build(cls, specs: Any):
        if not isinstance(specs, list):
            raise ValueError("a branch's 'steps' is a list of steps")
        return [s if isinstance(s, Step) else build_step(s, f"branch steps[{i}]") for i, s in enumerate(specs)]

    @field_serializer("steps")
    def _dump(self, steps: list[Step]) -> list[dict]:      # with each step's kind: a dump rebuilds the branch
        return [{"step": s.kind, **s.model_dump(mode="json", exclude_none=True)} for s in steps]


@register
class AnyOf(Step):
    kind = "any_of"
    is_global: ClassVar[bool] = True
    branches: list[Branch] = Field(min_length=2)

    @model_validator(mode="after")
    def _well_formed(self):
        names = [b.name for b in self.branches]
        if len(set(names)) != len(names):
            raise ValueError(f"branch names must differ: {names}")
        seen: list[str] = []
        for b in self.branches:
            if b.start is not None and b.start not in seen:
                raise ValueError(f"branch '{b.name}': from '{b.start}' is not a step of an earlier branch "
                                 f"(earlier steps: {', '.join(seen) or 'none'})")
            for s in b.steps:
                if s.kind == "any_of" or s.sets_copies:
                    raise ValueError(f"branch '{b.name}': step '{s.kind}' cannot run inside any_of "
                                     "(put it after the any_of: it decides over the union)")
            labels = self._step_labels(b)
            if clash := set(labels) & set(seen):
                raise ValueError(f"branch '{b.name}': step labels {sorted(clash)} repeat an earlier branch's; "
                                 "give the steps a 'name'")
            seen += labels
        return self

    @staticmethod
    def _step_labels(branch: Branch) -> list[str]:
        from winnow.filters.engine import _labels

        return _labels([s.label() for s in branch.steps])

    def nested(self) -> list[tuple[Branch, str, Step]]:
        """(branch, label, step) for every step, in branch order."""
        return [(b, lab, s) for b in self.branches for lab, s in zip(self._step_labels(b), b.steps)]

    def leaves(self) -> list[Step]:
        return [s for _, _, s in self.nested()]

    def requires(self):
        cols = sorted({c for _, _, s in self.nested() for c in s.requires()[0]})
        keys = sorted({k for _, _, s in self.nested() for k in s.requires()[1]})
        return cols, keys

    def files(self) -> list[str]:
        return [f for _, _, s in self.nested() for f in s.files()]

    def needs_fit(self) -> bool:
        return True       # its own pass group: a branch may select from all that reached it

    def _run(self, batch, fitted: dict, until: str | None = None) -> tuple[dict, dict]:
        """Run the branches over ``batch`` (the any_of's input rows) in order, up to the step
        labelled ``until`` (exclusive). Returns (each branch's copies so far, each step label's
        input mask); the input mask of ``until`` is what its fit must see."""
        n = len(batch)
        survivors: dict[str, np.ndarray] = {}     # step label -> its survivors' copies
        inputs: dict[str, np.ndarray] = {}
        results: dict[str, np.ndarray] = {}
        for b in self.branches:
            copies = np.ones(n, np.int64) if b.start is None else survivors[b.start].copy()
            for lab, s in zip(self._step_labels(b), b.steps):
                inputs[lab] = copies > 0
                if lab == until:
                    return results, inputs
                rows = np.flatnonzero(copies > 0)
                v = np.zeros(n, np.int64)
                if len(rows):
                    v[rows] = np.asarray(s.verdict(batch.select(rows), fitted.get(lab)), np.int64)
                copies = np.where(v > 0, copies * np.where(v > 1, v, 1), 0)
                survivors[lab] = copies
            results[b.name] = copies
        return results, inputs

    def fit(self, pool, alive) -> dict:
        fitted: dict = {}
        for _, lab, s in self.nested():
            if not s.needs_fit():
                continue

            def reach(shard, lab=lab):
                """The shard, and the mask of its samples that reach step ``lab``."""
                batch = pool.batch(shard)
                rows = np.flatnonzero(alive(shard))
                m = np.zeros(len(batch), bool)
                if len(rows):
                    m[rows] = self._run(batch.select(rows), fitted, until=lab)[1][lab]
                return batch, m

            if not s.fit_passes:
                fitted[lab] = s.fit(pool.fitting(lab), lambda shard, reach=reach: reach(shard)[1])
                continue
            state = s.fit_begin(pool)
            for p in range(s.fit_passes):
                state = s.fit_reduce((s.fit_shard(*reach(sh), p, state) for sh in pool.shards), p, state)
            fitted[lab] = state
        return fitted

    def verdict(self, batch, fitted: dict = None) -> np.ndarray:
        results, _ = self._run(batch, fitted or {})
        best = np.max(np.stack(list(results.values())), axis=0)
        return best if self._multiplies() else best > 0

    def _multiplies(self) -> bool:
        """Whether a branch can give a sample more than one copy (then the verdict is int copies
        on every shard, so the funnel reads one kind of verdict)."""
        return any(getattr(s, "mode", None) == "upsample" for _, _, s in self.nested())

    def explain(self, batch, fitted: dict = None) -> dict:
        results, _ = self._run(batch, fitted or {})
        out = {f"branch.{name}": v for name, v in results.items()}
        for _, lab, s in self.nested():
            out |= {f"{k}.{lab}": v for k, v in s.explain(batch, (fitted or {}).get(lab)).items()}
        return out

    def report(self, fitted: dict) -> dict:
        fitted = fitted or {}
        return {"branches": {b.name: {"from": b.start or "input",
                                      "steps": {lab: s.report(fitted.get(lab)) for lab, s in
                                                zip(self._step_labels(b), b.steps) if s.needs_fit()}}
                             for b in self.branches}}
