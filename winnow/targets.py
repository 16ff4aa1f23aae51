"""Alignment targets read from an embeddings file instead of embedded from task data.

DataComp's image-based baseline clusters the pool's ``l14_img`` and keeps the clusters nearest to
ImageNet-1k *train* images embedded by the same OpenAI L/14 — features it ships as torch files
(``{"image_features": tensor}``). A recipe names such files per task (``targets: {imagenet1k:
path}``, or ``filter.targets`` in params.yaml), so an alignment step needs no scorer and no images.
Accepted: ``.npy`` (an (n, d) array), ``.npz`` (one array, or ``image_features``), ``.pt`` / ``.pth``
(a tensor, or a dict with ``image_features``; loaded with ``weights_only=True``: never unpickled).
Rows are L2-normalised here, since the steps compare by inner product.
"""
from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import numpy as np

from winnow import io as wio
from winnow.config import ParamsError

KEYS = ("image_features", "features", "embeddings")


def load(path: str | list[str], normalize: bool = True) -> np.ndarray:
    """An (n, d) float32 array of unit rows (as stored with ``normalize=False``) from an embeddings
    file, or from several concatenated (DataComp ships its ImageNet-1k features in parts); a bad
    file is a ParamsError naming it."""
    if isinstance(path, (list, tuple)):
        parts = [load(p, normalize) for p in path]
        if len({x.shape[1] for x in parts}) > 1:
            raise ParamsError(f"targets files {path} have different widths {[x.shape[1] for x in parts]}")
        return np.concatenate(parts)
    p = wio.cache_local(path) if wio.is_remote(path) else wio.local(path)
    if not Path(p).is_file():
        raise ParamsError(f"targets file not found: {path}")
    suffix = Path(p).suffix
    try:
        if suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                key = next((k for k in KEYS if k in z.files), z.files[0] if len(z.files) == 1 else None)
                if key is None:
                    raise ParamsError(f"targets file {path} holds {z.files}: name one of {KEYS} or keep one array")
                arr = z[key]
        elif suffix in (".pt", ".pth"):
            import torch

            data = _pickle_of(p)
            if data is not None and b"_codecs" in data:
                # torch's weights-only unpickler lets _codecs.encode use any codec (a few hundred bytes
                # of "hex" re-encodings ask for gigabytes): such a file is read by ours, latin-1 only
                obj = _numpy_from_pickle(data)
            else:
                try:
                    with warnings.catch_warnings():   # torch's note on protocol 4 (DataComp's files): read below
                        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                        obj = torch.load(p, map_location="cpu", weights_only=True)
                except pickle.UnpicklingError:   # not tensors: DataComp's centroids are a NumPy array in torch.save's zip
                    if data is None:
                        raise
                    obj = _numpy_from_pickle(data)
            if isinstance(obj, dict):
                key = next((k for k in KEYS if k in obj), None)
                if key is None:
                    raise ParamsError(f"targets file {path} holds keys {sorted(obj)}: expected one of {KEYS}")
                obj = obj[key]
            arr = obj.float().numpy() if hasattr(obj, "numpy") else np.asarray(obj)
        else:
            raise ParamsError(f"targets file {path}: use .npy, .npz or .pt")
    except ParamsError:
        raise
    except Exception as exc:   # a corrupt or hostile file: named, never a traceback from deep inside
        raise ParamsError(f"targets file {path} cannot be read: {type(exc).__name__}: {exc}") from None
    arr = np.asarray(arr)
    if arr.dtype.kind not in "fiu":
        raise ParamsError(f"targets file {path}: expected numbers, got an array of {arr.dtype}")
    arr = arr.astype(np.float32)
    if arr.ndim != 2 or not len(arr) or not np.isfinite(arr).all():
        raise ParamsError(f"targets file {path}: expected a finite (n, d) array, got shape {arr.shape}")
    return arr / np.maximum(np.linalg.norm(arr, axis=1, keepdims=True), 1e-12) if normalize else arr


# What pickling a plain NumPy array names (NumPy 1 and 2): nothing else may be built. Under pickle
# protocol 2 (torch.save's default) the array's bytes come back through _codecs.encode(text, "latin1"),
# allowed with that codec only: it turns text into as many bytes, never more.
_NUMPY_GLOBALS = {("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype")}


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not part of a NumPy array")
    return text.encode("latin-1", errors="strict")


class _ArrayOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a NumPy array")

    def persistent_load(self, pid):   # torch tensor storages: a file of tensors goes through torch.load
        raise pickle.UnpicklingError("a tensor storage, not a NumPy array")


def _pickle_of(p) -> bytes | None:
    """The pickle inside a ``torch.save`` archive (its ``data.pkl``), or None for a file that is not
    one (torch's legacy format: torch.load reads it)."""
    import zipfile

    try:
        with zipfile.ZipFile(p) as z:
            name = next((n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")), None)
            if name is None:
                raise pickle.UnpicklingError("no data.pkl in the archive")
            if z.getinfo(name).compress_type != zipfile.ZIP_STORED:   # a deflate bomb: torch.save never compresses
                raise pickle.UnpicklingError("data.pkl is compressed, which torch.save never writes")
            return z.read(name)
    except zipfile.BadZipFile:
        return None


def _numpy_from_pickle(data: bytes) -> np.ndarray:
    """A NumPy array saved with ``torch.save`` (DataComp's ``image_based_clustering.py`` centroids:
    pickle protocol 4; or torch's default protocol 2), which torch's weights-only unpickler cannot
    read: the archive's pickle read by an unpickler that builds an ndarray and nothing else."""
    obj = _ArrayOnly(io.BytesIO(data)).load()
    if not isinstance(obj, np.ndarray):
        raise pickle.UnpicklingError(f"holds a {type(obj).__name__}, not a NumPy array")
    return obj
