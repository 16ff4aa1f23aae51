"""Duplicate removal across the whole pool."""
from __future__ import annotations

import numpy as np
from pydantic import PrivateAttr

from winnow.filters.base import Step, register
from winnow.pool import uids as U


@register
class DedupExact(Step):
    """Keep the first survivor (pool order) of each group of byte-identical images (``sha256``)."""
    kind = "dedup_exact"
    column: str = "sha256"
    _drop: dict = PrivateAttr(default_factory=dict)
    _groups: int = PrivateAttr(0)
    is_global = True

    def requires(self):
        return [self.column], []

    def fit(self, pool, alive) -> None:
        keys, owners = [], []
        for k, shard in enumerate(pool.shards):
            digest = pool.batch(shard).column(self.column)
            # the first 64 bits of the hex digest identify an image among billions; ints sort fast
            h = U.hex_to_array(np.asarray(digest, dtype="U32"), sort=False)["f0"]
            rows = np.flatnonzero(alive(shard))
            keys.append(h[rows])
            owners.append(np.stack([np.full(len(rows), k), rows], axis=1))
        keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        owners = np.concatenate(owners) if owners else np.zeros((0, 2), int)
        order = np.lexsort((owners[:, 1], owners[:, 0], keys))   # by digest, then pool order
        first = np.ones(len(order), bool)
        first[1:] = keys[order][1:] != keys[order][:-1]
        dup = owners[order][~first]
        self._groups = int(first.sum())
        self._drop = {pool.shards[k]: dup[dup[:, 0] == k, 1] for k in np.unique(dup[:, 0])}

    def keep(self, batch) -> np.ndarray:
        m = np.ones(len(batch), bool)
        m[self._drop.get(batch.shard, [])] = False
        return m

    def state(self) -> dict:
        return {"unique_images": self._groups, "duplicates": int(sum(len(v) for v in self._drop.values()))}
