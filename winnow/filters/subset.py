"""A subset given as a file of uids: DataComp's submission format (``np.save`` of sorted
``u8,u8`` uids, what its baselines write and its resharder reads)."""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import field_validator

from winnow.config import ParamsError, project_file
from winnow.filters.base import Step, register
from winnow.pool import uids as U


def read_uid_file(path: str) -> np.ndarray:
    """The file's uids as byte keys, or ParamsError naming what is wrong with it."""
    try:
        return U.byte_keys(U.load(project_file(path)))
    except FileNotFoundError:
        raise ParamsError(f"uid_list: no uid file at {path}") from None
    except (ValueError, OSError, U.UidError) as exc:   # not an .npy, pickled objects, wrong dtype, unsorted
        raise ParamsError(f"uid_list: {path} is not a DataComp uid file ({exc})") from None


@register
class UidList(Step):
    """Keep (``mode: keep``) or drop the samples whose uid is in a uid file: train on a published
    subset (a DataComp submission, DataComp-1B's uids), intersect a recipe with one, or take one
    out of it."""
    kind = "uid_list"
    is_global = True     # the driver reads the file once ("fit"); workers get its keys, no path
    path: str
    mode: Literal["keep", "drop"] = "keep"

    @field_validator("path")
    @classmethod
    def _readable(cls, v: str) -> str:
        read_uid_file(v)     # a missing or malformed file fails when the recipe loads, before any data
        return v

    def requires(self):
        return ["uid"], []

    def files(self) -> list[str]:
        return [str(project_file(self.path))]

    def fit(self, pool, alive) -> np.ndarray:
        return read_uid_file(self.path)

    def verdict(self, batch, fitted=None) -> np.ndarray:
        lo, hi = U.search(fitted, U.hex_to_array(batch.arrow("uid"), sort=False))
        listed = hi > lo
        return listed if self.mode == "keep" else ~listed

    def report(self, fitted) -> dict:
        return {"listed": 0 if fitted is None else len(fitted)}
