"""DataComp uid codec: 32-hex strings <-> the resharder's sorted ``u8,u8`` structured array.

The upper 64 bits go in field 0, the lower in field 1; arrays are sorted lexicographically so the
resharder can ``searchsorted``; duplicates are kept because they mean up-sampling.
"""
from __future__ import annotations

import hashlib
import re

import numpy as np

from winnow.errors import WinnowError

UID_DTYPE = np.dtype("u8,u8")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")


class UidError(WinnowError, ValueError):
    pass


_LUT = np.full(256, 255, dtype=np.uint8)
_LUT[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_LUT[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_LUT[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)
_SHIFTS = (4 * np.arange(15, -1, -1)).astype(np.uint64)
_HEXCHARS = np.frombuffer(b"0123456789abcdef", np.uint8)


def _arrow_bytes(col) -> np.ndarray | None:
    """An Arrow string column's characters as an (n, 32) uint8 view of its data buffer, when every
    value is present and 32 bytes long (no copy, no Python object per uid); else None."""
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if not pa.types.is_string(col.type) or col.null_count:
        return None
    offsets = np.frombuffer(col.buffers()[1], np.int32)[col.offset: col.offset + len(col) + 1]
    if len(col) and not (np.diff(offsets) == 32).all():
        return None
    data = np.frombuffer(col.buffers()[2], np.uint8) if len(col) else np.zeros(0, np.uint8)
    return data[offsets[0]: offsets[0] + 32 * len(col)].reshape(-1, 32)


def hex_to_array(uids, sort: bool = True) -> np.ndarray:
    """Vectorised: parse 32-hex uid strings (a sequence, or an Arrow string column: read straight
    from its buffer) into a ``u8,u8`` array (sorted unless told not to)."""
    raw = _arrow_bytes(uids) if hasattr(uids, "buffers") or hasattr(uids, "chunks") else None
    if raw is None and (hasattr(uids, "buffers") or hasattr(uids, "chunks")):
        uids = uids.to_numpy(zero_copy_only=False)
    arr = None
    if raw is None:
        arr = np.asarray(uids, dtype=object if not isinstance(uids, np.ndarray) else None)
        if len(arr):
            lengths = np.fromiter((len(u) if isinstance(u, str) else -1 for u in arr), int, len(arr))
            if (lengths != 32).any():
                bad = arr[lengths != 32][:3].tolist()
                raise UidError(f"{int((lengths != 32).sum())} uid(s) are not 32 hex characters, e.g. {bad}")
            raw = np.frombuffer(arr.astype("S32").tobytes(), np.uint8).reshape(-1, 32)
        else:
            raw = np.zeros((0, 32), np.uint8)
    out = np.empty(len(raw), dtype=UID_DTYPE)
    try:   # C speed; whitespace, which fromhex skips, shows as a short result and takes the slow path
        words = np.frombuffer(bytes.fromhex(raw.tobytes().decode("ascii")), ">u8")
    except (ValueError, UnicodeDecodeError):
        words = None
    if words is not None and len(words) == 2 * len(raw):
        out["f0"], out["f1"] = words[0::2], words[1::2]
    elif len(raw):
        nib = _LUT[raw]
        if (nib == 255).any():
            rows = np.flatnonzero((nib == 255).any(axis=1))[:3]
            bad = arr[rows].tolist() if arr is not None else [bytes(r).decode("utf-8", "replace") for r in raw[rows]]
            raise UidError(f"uid(s) with non-hex characters, e.g. {bad}")
        nib = nib.astype(np.uint64)
        out["f0"] = (nib[:, :16] << _SHIFTS).sum(axis=1, dtype=np.uint64)
        out["f1"] = (nib[:, 16:] << _SHIFTS).sum(axis=1, dtype=np.uint64)
    return sort_uids(out) if sort else out


def sort_uids(arr: np.ndarray, runs: bool = False) -> np.ndarray:
    """np.sort order of a ``u8,u8`` array (upper, then lower 64 bits), by a two-key lexsort: several
    times faster than sorting the structured dtype. ``runs``: ``arr`` is a concatenation of sorted
    runs (per-shard parts), which a stable sort of the upper halves merges in about n log(runs);
    equal upper halves of different uids (64-bit collisions) are then put in order by the lexsort."""
    if len(arr) < 2:
        return arr
    if runs:
        out = arr[np.argsort(arr["f0"], kind="stable")]
        tie = out["f0"][1:] == out["f0"][:-1]
        if not (tie & (out["f1"][1:] < out["f1"][:-1])).any():
            return out
    return arr[np.lexsort((arr["f1"], arr["f0"]))]


def array_to_hex(arr: np.ndarray) -> np.ndarray:
    """Vectorised inverse of :func:`hex_to_array` (order kept, duplicates kept)."""
    halves = [(arr[f].astype(np.uint64)[:, None] >> _SHIFTS) & np.uint64(15) for f in ("f0", "f1")]
    chars = _HEXCHARS[np.concatenate(halves, axis=1).astype(np.intp)]
    return np.ascontiguousarray(chars).view("S32").ravel().astype(str)


def is_valid_hex(uid: str) -> bool:
    return bool(_HEX32.match(uid))


def check_subset(arr: np.ndarray) -> None:
    """Raise UidError unless ``arr`` is what the resharder accepts: ``u8,u8`` and sorted."""
    if arr.dtype != UID_DTYPE:
        raise UidError(f"uid array dtype is {arr.dtype}, expected {UID_DTYPE} (upper, lower 64 bits)")
    hi, lo = arr["f0"], arr["f1"]
    if len(arr) > 1 and not ((hi[:-1] < hi[1:]) | ((hi[:-1] == hi[1:]) & (lo[:-1] <= lo[1:]))).all():
        raise UidError("uid array is not sorted; the resharder needs np.sort order")


def digest(arr: np.ndarray) -> str:
    """A hash of a uid array's bytes (a job key's identity of a subset)."""
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def save(path, arr: np.ndarray) -> None:
    from winnow.io import atomic_file

    check_subset(arr)
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, arr)


def load(path) -> np.ndarray:
    from winnow.io import local

    arr = np.load(local(path), allow_pickle=False)
    check_subset(arr)
    return arr


def byte_keys(arr: np.ndarray) -> np.ndarray:
    """Each uid as 16 big-endian bytes (``S16``): they order as the ``u8,u8`` pairs do, and numpy
    compares them with memcmp — searchsorted is ~10x faster than on the structured dtype."""
    return np.ascontiguousarray(arr.astype([("f0", ">u8"), ("f1", ">u8")])).view("S16").ravel()


def search(subset: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi) of each ``query`` uid in the sorted ``subset`` (``hi - lo``: its multiplicity);
    ``subset`` may be given as its byte_keys, converted once for many queries."""
    keys = subset if subset.dtype == np.dtype("S16") else byte_keys(subset)
    q = byte_keys(query)
    order = np.argsort(q, kind="stable")     # ascending queries walk the subset once: cache-friendly
    lo, hi = np.empty(len(q), np.intp), np.empty(len(q), np.intp)
    lo[order] = np.searchsorted(keys, q[order], side="left")
    hi[order] = np.searchsorted(keys, q[order], side="right")
    return lo, hi


def multiplicity(subset: np.ndarray, query: np.ndarray) -> np.ndarray:
    """How many times each ``query`` uid occurs in the sorted ``subset`` (0 = not selected)."""
    lo, hi = search(subset, query)
    return hi - lo


class SortedUids:
    """A sorted ``u8,u8`` subset read a slice at a time: an ``.npy`` path (DataComp's uids file,
    read with plain file reads, so no more of it is resident than the slice asked for) or an array.
    Opening checks dtype and order one chunk at a time and counts the entries per leading uid byte
    (the partitions :func:`winnow.reshard.plan` works in)."""

    CHUNK = 1 << 18     # 4 MiB of uids per read: a subset of any size opens in the same memory

    def __init__(self, src):
        self._arr, self._path, self._offset = None, None, 0
        if isinstance(src, np.ndarray):
            check_subset(src)
            self._arr, n = src, len(src)
        else:
            from winnow.io import local

            self._path = local(src)
            with open(self._path, "rb") as fh:
                try:
                    version = np.lib.format.read_magic(fh)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read_header(fh)
                except ValueError as exc:
                    raise UidError(f"{src} is not an .npy file: {exc}") from None
                self._offset = fh.tell()
            if dtype != UID_DTYPE or len(shape) != 1 or fortran:
                raise UidError(f"uid array dtype is {dtype} (shape {shape}), expected 1-D {UID_DTYPE} "
                               "(upper, lower 64 bits)")
            n = shape[0]
            if self._path.stat().st_size < self._offset + n * UID_DTYPE.itemsize:
                raise UidError(f"{src} is truncated: its header says {n} uids")
        self.n = n
        self.per_byte = np.zeros(256, np.int64)     # entries whose uid starts with each byte
        h = hashlib.sha256()                         # digest(): the same bytes, hashed on this one pass
        last = None
        for _, part in self.chunks():
            if last is not None and len(part) and \
                    (part["f0"][0], part["f1"][0]) < (last["f0"], last["f1"]):
                raise UidError("uid array is not sorted; the resharder needs np.sort order")
            check_subset(part)
            self.per_byte += np.bincount((part["f0"] >> np.uint64(56)).astype(np.intp), minlength=256)
            h.update(np.ascontiguousarray(part).tobytes())
            last = part[-1] if len(part) else last
        self.byte_starts = np.concatenate([[0], np.cumsum(self.per_byte)])
        self._digest = h.hexdigest()

    def __len__(self) -> int:
        return self.n

    def read(self, start: int, stop: int) -> np.ndarray:
        if self._arr is not None:
            return self._arr[start:stop]
        return np.fromfile(self._path, UID_DTYPE, count=max(0, stop - start),
                           offset=self._offset + start * UID_DTYPE.itemsize)

    def chunks(self, rows: int | None = None):
        rows = rows or self.CHUNK
        for start in range(0, self.n, rows):
            yield start, self.read(start, min(self.n, start + rows))

    def digest(self) -> str:
        """:func:`digest` of the whole array (hashed a chunk at a time when opened)."""
        return self._digest

    def save(self, path) -> None:
        """The bytes :func:`save` writes for the whole array, written a chunk at a time."""
        from winnow.io import atomic_file

        with atomic_file(path) as tmp:
            with open(tmp, "wb") as fh:
                np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(UID_DTYPE),
                                                          "fortran_order": False, "shape": (self.n,)})
                for _, part in self.chunks():
                    fh.write(np.ascontiguousarray(part).tobytes())
