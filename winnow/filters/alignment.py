"""Data-distribution alignment: steps that move the subset toward the downstream tasks.

Targets are the embed stage's ``targets.npz`` (task *train* images ``img:<task>`` and class-name x
template texts ``txt:<task>``; DataComp allows both, never test images). All decisions are made
from small global state (queries' running top-k, k-means centroids, per-cluster factors), one
shard at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import Field

from winnow.config import ParamsError
from winnow.filters.base import Step, register
from winnow.pool.shards import ShardError


def _check_width(e: np.ndarray, width: int | None, shard: str, key: str, against: str) -> None:
    """A shard's embeddings must have the width of what they are compared with (ShardError)."""
    if width is not None and (e.ndim != 2 or e.shape[1] != width):
        raise ShardError(f"shard {shard}: embedding '{key}' has shape {e.shape}, {against} have width {width}")


def _targets(pool, tasks: list[str] | None, modality: str) -> np.ndarray:
    t = pool.targets()
    keys = [k for k in t if k.startswith(f"{modality}:") and (tasks is None or k.split(":", 1)[1] in tasks)]
    if not keys:
        have = ", ".join(sorted(t)) or "none (run the embed stage with a task suite)"
        raise ParamsError(f"no '{modality}' target embeddings for tasks {tasks or 'any'} (available: {have})")
    return np.concatenate([t[k] for k in keys])


class SurvivorSample:
    """An even random sample of the survivors' embeddings (at most ``size`` rows) for k-means, in two
    map-reduce passes: pass 0 counts each shard's survivors and finite rows; pass 1 samples each
    shard with its own slice of one ``default_rng(seed)`` stream (PCG64 advanced by the finite rows
    of the shards before it), so the sample is the same on every executor and in any shard order."""

    def __init__(self, key: str, size: int, seed: int):
        self.key, self.size, self.seed = key, size, seed
        self.rate, self.offsets, self.width = 1.0, {}, None

    def part(self, batch, alive: np.ndarray, pass_no: int):
        e = batch.embedding(self.key)
        if e.ndim != 2:
            raise ShardError(f"shard {batch.shard}: embedding '{self.key}' has shape {e.shape}, not rows x width")
        e = e[alive]
        e = e[np.isfinite(e).all(axis=1)]
        if pass_no == 0:
            return batch.shard, int(alive.sum()), len(e), e.shape[1]
        bits = np.random.PCG64(self.seed)
        bits.advance(self.offsets[batch.shard])
        return e[np.random.Generator(bits).random(len(e)) < self.rate]

    def reduce(self, parts, pass_no: int) -> np.ndarray | None:
        """Pass 0: offsets and the sampling rate (and one embedding width across shards: a shard
        whose width differs fails naming it); pass 1: the sample, (0, width) when no survivor."""
        if pass_no == 0:
            total, offset = 0, 0
            for shard, n_alive, n_finite, width in parts:
                if self.width is None:
                    self.width = width
                _check_width(np.zeros((0, width)), self.width, shard, self.key, "earlier shards")
                self.offsets[shard] = offset
                total, offset = total + n_alive, offset + n_finite
            self.rate = min(1.0, self.size / max(1, total))
            return None
        parts = list(parts)
        return np.concatenate(parts) if parts else np.zeros((0, self.width or 0), np.float32)


FAISS_NITER = 20                   # DataComp's image_based_clustering.py: faiss.Clustering, niter 20,
FAISS_MAX_POINTS = 10_000_000      # max_points_per_centroid 1e7 (no sub-sampling), an L2 flat index


def _kmeans(x: np.ndarray, k: int, seed: int, engine: str = "sklearn") -> np.ndarray | None:
    """Centroids; None when there is nothing to cluster (earlier steps kept no sample with a finite
    embedding). ``sklearn``: unit-norm centroids (spherical k-means on normalised vectors).
    ``faiss``: DataComp's own clustering (``image_based_clustering.train_kmeans`` on CPU: L2
    k-means, FAISS_NITER iterations, no sub-sampling, ``seed``), its centroids as it stores them."""
    if not len(x):
        return None
    k = max(1, min(k, len(x)))
    if engine == "faiss":
        import faiss

        x = np.ascontiguousarray(x, dtype=np.float32)
        cluster = faiss.Clustering(x.shape[1], k)
        cluster.niter, cluster.seed, cluster.max_points_per_centroid = FAISS_NITER, seed, FAISS_MAX_POINTS
        cluster.train(x, faiss.IndexFlatL2(x.shape[1]))
        return faiss.vector_float_to_array(cluster.centroids).reshape(k, x.shape[1])
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=1, random_state=seed, max_iter=50).fit(x)
    c = km.cluster_centers_
    return (c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _assign(e: np.ndarray, centroids: np.ndarray | None, shard: str = "?", key: str = "?",
            l2: bool = False) -> np.ndarray:
    """Nearest centroid by inner product (DataComp's rule), or with ``l2`` by Euclidean distance
    (the partition L2 k-means fitted: argmax 2 e·c - |c|²); -1 for rows without a finite
    embedding, and for every row when there are no centroids (nothing was clustered)."""
    if centroids is None:
        return np.full(len(e), -1)
    _check_width(e, centroids.shape[1], shard, key, "the k-means centroids")
    ok = np.isfinite(e).all(axis=1)
    out = np.full(len(e), -1)
    if ok.any():
        score = e[ok] @ centroids.T
        out[ok] = (2 * score - (centroids ** 2).sum(axis=1) if l2 else score).argmax(axis=1)
    return out


@register
class Retrieval(Step):
    """Keep (``mode: keep``) or up-sample (``mode: upsample``) the pool samples nearest to task data:
    for each query the ``k`` most similar survivors by cosine, union over queries. Queries are task
    train images (``image``: image->image) and/or class prompts (``text``: text->image)."""
    kind = "retrieval"
    is_global = True
    tasks: list[str] | None = None
    queries: list[Literal["image", "text"]] = ["image", "text"]
    key: str = "scorer_img"
    k: int = Field(20, ge=1)
    mode: Literal["keep", "upsample"] = "keep"
    factor: int = Field(2, ge=2)

    def requires(self):
        return [], [self.key]

    fit_passes = 1      # each shard's top-k per query on the executor; the driver merges them in pool order

    def fit_begin(self, pool) -> np.ndarray:
        """The queries."""
        return np.concatenate([_targets(pool, self.tasks, "img" if m == "image" else "txt") for m in self.queries])

    def fit_shard(self, batch, alive: np.ndarray, pass_no: int, queries: np.ndarray):
        """(shard, each query's top-k survivor scores, their rows) — nothing when no survivor."""
        e = batch.embedding(self.key)
        _check_width(e, queries.shape[1], batch.shard, self.key, "the task targets")
        rows = np.flatnonzero(alive & np.isfinite(e).all(axis=1))
        if not len(rows):
            return batch.shard, None, None
        s = queries @ e[rows].T
        take = min(self.k, len(rows))
        top = np.argpartition(-s, take - 1, axis=1)[:, :take]
        return batch.shard, np.take_along_axis(s, top, 1), rows[top]

    def fit_reduce(self, parts, pass_no: int, queries: np.ndarray) -> "Hits":
        nq = len(queries)
        best_s = np.full((nq, 0), -np.inf, np.float32)
        best_i = np.zeros((nq, 0, 2), np.int64)
        shards = []
        for k, (shard, s, rows) in enumerate(parts):
            shards.append(shard)
            if s is None:
                continue
            cand_s = np.concatenate([best_s, s], axis=1)
            cand_i = np.concatenate([best_i, np.stack([np.full(rows.shape, k), rows], axis=-1)], axis=1)
            # ties broken by pool position so every executor picks the same samples
            order = np.lexsort((cand_i[..., 1], cand_i[..., 0], -cand_s), axis=1)[:, : self.k]
            best_s = np.take_along_axis(cand_s, order, 1)
            best_i = np.take_along_axis(cand_i, order[..., None], 1)
        hits = np.unique(best_i.reshape(-1, 2), axis=0)
        return Hits({shards[k]: hits[hits[:, 0] == k, 1] for k in np.unique(hits[:, 0])}, nq)

    def verdict(self, batch, fitted: "Hits" = None) -> np.ndarray:
        hit = np.isin(batch.positions(), fitted.rows.get(batch.shard, []))
        if self.mode == "keep":
            return hit
        return np.where(hit, self.factor, 1).astype(np.int64)

    def report(self, fitted: "Hits") -> dict:
        return {"queries": fitted.queries, "retrieved": int(sum(len(v) for v in fitted.rows.values()))} if fitted else {}


@dataclass
class Hits:
    """Retrieval's fitted value: the retrieved rows (shard -> row indices), and how many queries."""
    rows: dict
    queries: int


@dataclass
class Clusters:
    """A k-means step's state: the survivor sample while it is drawn, then the centroids and what the
    step derives from them (target clusters; per-cluster keep rates and repeats)."""
    sample: SurvivorSample | None = None
    targets: np.ndarray | None = None
    centroids: np.ndarray | None = None
    keep: np.ndarray | None = None
    keep_rate: np.ndarray = field(default_factory=lambda: np.zeros(0))
    repeat: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


class _KMeansStep(Step):
    """A global step whose fit starts with k-means over a sample of the survivors' image embeddings:
    passes 0-1 draw the sample (SurvivorSample) on the executor, the driver fits the centroids.
    With ``centroids`` (a file of pool-wide centroids, as DataComp ships per scale) nothing is
    sampled or fitted: the passes read nothing and the driver loads them, as they are stored.
    Subclasses declare ``key``, ``clusters``, ``sample`` and continue in ``clustered``
    (driver) or in further passes. The state is a :class:`Clusters`."""
    is_global = True
    fit_passes = 2
    centroids: str | None = None
    kmeans: Literal["sklearn", "faiss"] = "sklearn"    # faiss: DataComp's clustering (_kmeans)
    seed: int = Field(0, ge=0, lt=2**31)               # faiss takes a C int

    def files(self) -> list[str]:
        return [self.centroids] if self.centroids else []

    def fit_begin(self, pool) -> Clusters:
        return Clusters(sample=None if self.centroids else SurvivorSample(self.key, self.sample, self.seed))

    def fit_shard(self, batch, alive: np.ndarray, pass_no: int, state: Clusters):
        return None if state.sample is None else state.sample.part(batch, alive, pass_no)

    def fit_reduce(self, parts, pass_no: int, state: Clusters) -> Clusters:
        if state.sample is None:
            for _ in parts:   # the passes' units: nothing to combine
                pass
            if pass_no == 1:
                from winnow import targets

                state.centroids = targets.load(self.centroids, normalize=False)
                self.clustered(state)
            return state
        x = state.sample.reduce(parts, pass_no)
        if pass_no == 1:
            state.centroids, state.sample = _kmeans(x, self.clusters, self.seed, self.kmeans), None
            self.clustered(state)
        return state

    def clustered(self, state: Clusters) -> None:
        """Driver-side work once the centroids are known."""


@register
class ImageClusters(_KMeansStep):
    """DataComp's image-based filtering: k-means over the survivors' image embeddings; keep samples
    whose cluster is the nearest cluster of at least one target (task train) image."""
    kind = "image_clusters"
    tasks: list[str] | None = None
    key: str = "scorer_img"
    clusters: int = Field(100, ge=1)
    sample: int = Field(100_000, ge=1)

    def requires(self):
        return [], [self.key]

    def fit_begin(self, pool) -> Clusters:
        state = super().fit_begin(pool)
        state.targets = _targets(pool, self.tasks, "img")     # fails before any pass when missing
        return state

    def clustered(self, state: Clusters) -> None:
        if state.centroids is None:            # earlier steps kept nothing: keep nothing
            state.keep = np.zeros(0, int)
        else:
            _check_width(state.targets, state.centroids.shape[1], "(targets)", "img targets", "the pool's embeddings")
            a = _assign(state.targets, state.centroids)
            state.keep = np.unique(a[a >= 0])
        state.targets = None     # not needed to decide: the workers need not receive them

    def verdict(self, batch, fitted: Clusters = None) -> np.ndarray:
        return np.isin(_assign(batch.embedding(self.key), fitted.centroids, batch.shard, self.key), fitted.keep)

    def report(self, fitted: Clusters) -> dict:
        return {"clusters": 0 if fitted.centroids is None else len(fitted.centroids),
                "target_clusters": 0 if fitted.keep is None else len(fitted.keep)} if fitted else {}


@register
class Rebalance(_KMeansStep):
    """Rebalance the survivors over k-means clusters of their image embeddings, counting each
    sample with the copies earlier steps made of it (retrieval's up-sampling): clusters holding
    more than ``cap`` x the median cluster's copies are thinned to that many (each sample's copies
    scaled by the cluster's rate and rounded deterministically by uid, so a retrieved sample
    loses copies before a single-copy one is dropped), and clusters below the median are
    up-sampled up to ``max_repeat`` times — emitted as uid multiplicities, which DataComp's
    resharder writes as copies."""
    kind = "rebalance"
    sets_copies = True
    key: str = "scorer_img"
    clusters: int = Field(50, ge=1)
    sample: int = Field(100_000, ge=1)
    cap: float = Field(3.0, gt=0)
    max_repeat: int = Field(2, ge=1)

    def requires(self):
        return ["uid"], [self.key]

    fit_passes = 3      # the survivor sample (2 passes), k-means in the driver, then cluster sizes

    def _l2(self) -> bool:
        """faiss centroids are L2 means, not unit vectors: cluster sizes are counted in the partition
        k-means fitted (by inner product 6.9% of 20k unit vectors moved cluster, 50 clusters)."""
        return self.kmeans == "faiss"

    def fit_shard(self, batch, alive: np.ndarray, pass_no: int, state: Clusters):
        if pass_no < 2:      # the survivor sample: survivors once each, whatever their copies
            return super().fit_shard(batch, np.asarray(alive) > 0, pass_no, state)
        if state.centroids is None:
            return np.zeros(0, np.int64)
        a = _assign(batch.embedding(self.key), state.centroids, batch.shard, self.key, self._l2())
        ok = (alive > 0) & (a >= 0)      # alive: each sample's copies (sets_copies)
        return np.bincount(a[ok], weights=alive[ok], minlength=len(state.centroids)).astype(np.int64)

    def fit_reduce(self, parts, pass_no: int, state: Clusters) -> Clusters:
        if pass_no < 2:
            return super().fit_reduce(parts, pass_no, state)
        counts = np.zeros(0 if state.centroids is None else len(state.centroids), np.int64)
        for c in parts:
            counts += c
        median = float(np.median(counts[counts > 0])) if (counts > 0).any() else 0.0
        limit = self.cap * median
        state.keep_rate = np.where(counts > limit, limit / np.maximum(counts, 1), 1.0)
        state.repeat = np.clip(np.round(median / np.maximum(counts, 1)), 1, self.max_repeat).astype(np.int64)
        return state

    def verdict(self, batch, fitted: Clusters = None, copies: np.ndarray | None = None) -> np.ndarray:
        """Each sample's copies: ``copies`` x the cluster's keep rate, rounded up with probability
        equal to the fraction (a uniform from the uid: the same on every run), x its repeat."""
        from winnow.pool import uids as U

        c = _assign(batch.embedding(self.key), fitted.centroids, batch.shard, self.key, self._l2())
        if fitted.centroids is None or not len(fitted.keep_rate):      # nothing was clustered: keep nothing
            return np.zeros(len(c), np.int64)
        copies = np.ones(len(c), np.int64) if copies is None else np.asarray(copies, np.int64)
        u = U.hex_to_array(batch.column("uid"), sort=False)["f1"].astype(np.float64) / 2.0**64
        ok = c >= 0
        cc = np.where(ok, c, 0)
        scaled = copies * fitted.keep_rate[cc]
        kept = np.floor(scaled) + (u < scaled - np.floor(scaled))
        return np.where(ok, kept * fitted.repeat[cc], 0).astype(np.int64)

    def report(self, fitted: Clusters) -> dict:
        if fitted is None:
            return {}
        return {"clusters": len(fitted.keep_rate), "capped_clusters": int((fitted.keep_rate < 1).sum()),
                "upsampled_clusters": int((fitted.repeat > 1).sum())}
