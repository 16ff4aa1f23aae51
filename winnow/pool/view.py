"""A read view of a pool (+ the embed stage's outputs) one shard at a time.

``Pool.open(dir)`` reads ``manifest.json``: the demo pool lives in that directory; an external
DataComp pool is referenced by ``uri`` and nothing is copied. In DataComp's download layout
(``layout: download``) the pool's shards are the metadata files and their images live in
img2dataset's shards, joined by uid (``winnow.pool.datacomp``): a shard's ``downloaded`` column says
which of its samples have an image.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from winnow import io as wio
from winnow.io import atomic_file, read_json
from winnow.pool import shards


@dataclass
class Pool:
    uri: str                      # where the shards are
    shards: list[str]
    manifest: dict
    embed_uri: str | None = None  # the embed stage's per-shard outputs, when available
    scratch: str | None = None    # a run's directory for per-shard values derived once (ShardView.cached)
    fit_dir: str | None = None    # the working directory of the global step being fitted (one per step label)
    target_files: dict = field(default_factory=dict)   # task -> embeddings file (winnow.targets), image targets

    def fitting(self, label: str) -> "Pool":
        """This pool for fitting the global step ``label``: its own working directory under the
        run's scratch (a nested step's under its parent's), so two equal steps never share one."""
        from winnow.jobs import digest

        base = self.fit_dir or (str(Path(self.scratch) / "fit") if self.scratch else None)
        return replace(self, fit_dir=str(Path(base) / digest(label, 16))) if base else self

    @classmethod
    def open(cls, pool_dir: str, embed_uri: str | None = None) -> "Pool":
        where = wio.join(pool_dir, "manifest.json")
        try:
            manifest = read_json(where)
        except FileNotFoundError:
            raise shards.ShardError(f"no pool manifest at {where}: run the pool stage first") from None
        except ValueError as exc:   # not JSON, not UTF-8
            raise shards.ShardError(f"pool manifest {where} is unreadable: {exc}") from None
        uri = manifest.get("uri", ".") if isinstance(manifest, dict) else None
        found = manifest.get("shards") if isinstance(manifest, dict) else None
        if not isinstance(uri, str) or not (found is None or isinstance(found, list) and all(isinstance(x, str) for x in found)):
            raise shards.ShardError(f"pool manifest {where} is malformed: expected an object with a string 'uri' "
                                    "and a list of shard names")
        uri = str(wio.join(pool_dir)) if uri == "." else uri
        return cls(uri=uri, shards=found or shards.discover(uri), manifest=manifest, embed_uri=embed_uri)

    @property
    def is_download(self) -> bool:
        """DataComp's download layout: metadata files + img2dataset shards (not every sample has an image)."""
        return self.manifest.get("layout") == "download"

    @property
    def images_uri(self) -> str | None:
        return self.manifest.get("images_uri") if self.is_download else self.uri

    def image_shards(self, shard: str) -> list[str]:
        """The image shards (tars in ``images_uri``) that hold this shard's samples."""
        if self.is_download:
            return list(self.manifest.get("images", {}).get(shard, []))
        return [shard]

    def all_image_shards(self) -> list[str]:
        """Every image shard once, in order (img2dataset's numeric order on a download)."""
        if self.is_download:
            return list(self.manifest.get("image_shards", []))
        return list(self.shards)

    @property
    def truth_path(self) -> Path | str | None:
        p = wio.join(self.uri, "truth.parquet")
        return p if wio.exists(p) else None

    def targets(self) -> dict[str, np.ndarray]:
        """Downstream-task embeddings (``img:<task>``, ``txt:<task>``): those the embed stage wrote,
        and image targets read from the files the recipe names (which win)."""
        out = {}
        if self.embed_uri and wio.exists(p := wio.join(self.embed_uri, "targets.npz")):
            with np.load(wio.source(p), allow_pickle=False) as z:
                out = {k: z[k].astype(np.float32) for k in z.files}
        if self.target_files:
            from winnow import targets

            out |= {f"img:{task}": targets.load(path) for task, path in self.target_files.items()}
        return out

    def batch(self, shard: str) -> "ShardView":
        return ShardView(self, shard)


class Rows:
    """Some rows of a shard (the samples that reached a step): every column and embedding is read
    as the shard's and indexed alike, so a step computes only on these rows."""

    def __init__(self, batch: "ShardView", rows: np.ndarray):
        self.batch, self.rows = batch, rows
        self.shard = batch.shard

    def __len__(self) -> int:
        return len(self.rows)

    def positions(self) -> np.ndarray:
        return self.rows

    def select(self, rows: np.ndarray) -> "Rows":
        return self if len(rows) == len(self) else Rows(self.batch, self.rows[rows])

    def columns(self) -> list[str]:
        return self.batch.columns()

    def embedding_keys(self) -> list[str]:
        return self.batch.embedding_keys()

    def arrow(self, name: str) -> pa.Array:
        return self.batch.arrow(name).take(pa.array(self.rows))

    def column(self, name: str) -> np.ndarray:
        return self.batch.column(name)[self.rows]

    def embedding(self, key: str) -> np.ndarray:
        return self.batch.embedding(key)[self.rows]

    def cached(self, name: str, compute) -> np.ndarray:
        return self.batch.cached(name, compute)[self.rows]    # computed over the whole shard, then indexed


@dataclass
class ShardView:
    """One shard's columns and embeddings, each read on first use and only that one: a step that
    needs a score never pays for captions, urls or face boxes."""
    pool: Pool
    shard: str
    _cols: dict = field(default_factory=dict)
    _emb: dict = field(default_factory=dict)
    _npz: dict | None = None
    _schema: list | None = None
    _blobs: dict = field(default_factory=dict)
    _derived: dict = field(default_factory=dict)
    _files: dict = field(default_factory=dict)

    def _src(self, p):
        """A readable source of a shard file; a remote one is downloaded once per batch."""
        if not wio.is_remote(p):
            return p
        import io

        if p not in self._blobs:
            self._blobs[p] = wio.read_bytes(p)
        return io.BytesIO(self._blobs[p])

    def _sources(self) -> list[tuple[str, object]]:
        """(column names, parquet path) of the pool metadata, then the embed stage's scores."""
        if self._schema is None:
            srcs = [shards.path(self.pool.uri, self.shard, "parquet")]
            if self.pool.embed_uri and wio.exists(p := shards.path(self.pool.embed_uri, self.shard, "parquet")):
                srcs.append(p)
            self._schema = []
            for p in srcs:
                try:
                    f = pq.ParquetFile(self._src(p))
                except FileNotFoundError:
                    raise shards.ShardError(f"shard {self.shard}: metadata {p} is missing") from None
                except (pa.ArrowInvalid, OSError) as exc:
                    raise shards.ShardError(f"shard {self.shard}: cannot read {p}: {exc}") from None
                self._schema.append((f.schema_arrow.names, p, f.metadata.num_rows))
                self._files[p] = f     # its footer is parsed once: every column read reuses it
        return self._schema

    def __len__(self) -> int:
        return self._sources()[0][2]

    def positions(self) -> np.ndarray:
        """Row numbers in the shard (a ``Rows`` selection has its own)."""
        return np.arange(len(self))

    def select(self, rows: np.ndarray) -> "ShardView | Rows":
        return self if len(rows) == len(self) else Rows(self, rows)

    def cached(self, name: str, compute) -> np.ndarray:
        """A per-sample array derived from this shard (e.g. a cosine from two embeddings), computed
        once per run as ``compute(shard view)`` — over the whole shard, also when a ``Rows``
        selection asks — and with ``pool.scratch`` set saved there, so later passes and other
        worker processes read it back instead of recomputing."""
        if name in self._derived:
            return self._derived[name]
        path = Path(self.pool.scratch) / f"{name}-{self.shard}.npy" if self.pool.scratch else None
        if path is not None and path.exists():
            value = np.load(path, allow_pickle=False)
        else:
            value = np.asarray(compute(self))
            if path is not None:
                with atomic_file(path, wio.UNIT_DURABLE) as tmp, open(tmp, "wb") as fh:   # a job's scratch
                    np.save(fh, value)
        self._derived[name] = value
        return value

    def columns(self) -> list[str]:
        derived = ["downloaded"] if self.pool.is_download else []
        return [c for names, _, _ in self._sources() for c in names] + derived

    def arrow(self, name: str) -> pa.ChunkedArray:
        if name == "downloaded" and self.pool.is_download and name not in self._cols:
            from winnow.pool import datacomp

            mask = datacomp.downloaded_mask(self.column("uid"), self.pool.images_uri, self.pool.image_shards(self.shard))
            self._cols[name] = pa.chunked_array([pa.array(mask)])
        if name not in self._cols:
            for names, p, _ in self._sources():
                if name in names:
                    try:
                        self._cols[name] = self._files[p].read(columns=[name])[name]
                    except (pa.ArrowInvalid, OSError) as exc:
                        raise shards.ShardError(f"shard {self.shard}: cannot read column {name} of {p}: {exc}") from None
                    break
            else:
                raise KeyError(f"shard {self.shard}: no column '{name}' (available: {', '.join(self.columns())})")
        return self._cols[name]

    def column(self, name: str) -> np.ndarray:
        return self.arrow(name).to_numpy(zero_copy_only=False)

    def _npz_sources(self) -> dict[str, object]:
        """embedding key -> npz path, from the zip index only. The embed stage's keys win over the
        pool's own (e.g. ``l14_img`` re-embedded from the images beside its new ``l14_img_flip``)."""
        if self._npz is None:
            self._npz = {}
            for src in ([self.pool.embed_uri] if self.pool.embed_uri else []) + [self.pool.uri]:
                p = shards.path(src, self.shard, "npz")
                if wio.exists(p):
                    for k in _load_npz(self._src(p), self.shard, label=p):
                        self._npz.setdefault(k, p)
        return self._npz

    def embedding_keys(self) -> list[str]:
        return list(self._npz_sources())

    def from_images(self, columns: list[str], keys: list[str]) -> bool:
        """Whether any of these columns or embedding keys is the embed stage's, computed from the
        images (so a sample without an image has none)."""
        if not self.pool.embed_uri:
            return False
        embed_cols = {c for names, p, _ in self._sources() if str(p).startswith(str(self.pool.embed_uri))
                      for c in names if c != "uid"}
        embed_keys = {k for k, p in self._npz_sources().items() if str(p).startswith(str(self.pool.embed_uri))}
        return bool(set(columns) & embed_cols or set(keys) & embed_keys)

    def embedding_rows(self, key: str) -> int:
        """Rows of an embedding array, read from its header without loading it."""
        p = self._npz_sources()[key]
        return _load_npz(self._src(p), self.shard, key, header_only=True, label=p)

    def embedding(self, key: str) -> np.ndarray:
        if key not in self._emb:
            if key not in self._npz_sources():
                raise KeyError(f"shard {self.shard}: no embedding '{key}' (available: {', '.join(self.embedding_keys())})")
            p = self._npz_sources()[key]
            self._emb[key] = _load_npz(self._src(p), self.shard, key, label=p)
        return self._emb[key]


def _load_npz(p, shard: str, key: str | None = None, header_only: bool = False, label=None):
    """The keys of an npz (``key`` None), one array as float32, or its row count; any corruption
    (zip, npy header, truncation) becomes a ShardError naming the shard."""
    import zipfile

    try:
        if header_only:
            with zipfile.ZipFile(p) as zf, zf.open(f"{key}.npy") as fh:
                major, _ = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                return int(read(fh)[0][0])
        with np.load(p, allow_pickle=False) as z:
            if key is None:
                return list(z.files)
            v = z[key].astype(np.float32)
    except Exception as exc:   # zip/npy corruption surfaces as many types
        raise shards.ShardError(f"shard {shard}: cannot read {label or p}: {type(exc).__name__}: {exc}") from None
    shards.check_embedding(v, shard, f"{label or p} '{key}'")
    return v
