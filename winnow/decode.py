"""JPEG decode and open_clip preprocessing as tensor ops, on the GPU (nvjpeg through torchvision)
or the CPU: the alternative to PIL decode in DataLoader workers when the host's cores are the
bottleneck. The preprocessing follows the model's ``preprocess_cfg`` (open_clip's default "shortest"
resize: bicubic resize of the short side with antialiasing, centre crop, normalise); results match
the PIL path up to resampling differences.

Untrusted images are checked before any decoder runs: :func:`check_image` reads the declared
dimensions from the header alone (PIL's ``Image.open`` is lazy) and refuses images above a pixel cap
(:class:`ImageTooLarge`, a decompression bomb: a 2 MB JPEG can declare 13,500² pixels, 521 MiB
decoded) or in a format outside the allowlist. :func:`open_image` is the safe PIL decode;
:data:`MAX_MEMBER_BYTES` caps what a reader takes from one tar member; :func:`allowed_member` and
:func:`filter_sample` are the allowlist of webdataset member types (never ``.pyd``/``.pickle``/
``.pth``, whose default decoders unpickle, nor ``.gz``).
"""
from __future__ import annotations

import io
import tarfile
import warnings

import torch

from winnow.errors import WinnowError

MAX_PIXELS = 8192 * 8192                 # the largest image decoded (declared width x height)
MAX_MEMBER_BYTES = 64 * 2**20            # the largest tar member read into memory
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")  # PIL formats decoded; never EPS (Ghostscript) or the like
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
ALLOWED_SUFFIXES = frozenset(IMAGE_SUFFIXES + ("txt", "json", "cls"))   # webdataset members winnow reads


class ImageError(WinnowError, ValueError):
    """An image that is refused before or while decoding (corrupt, unsupported, too large)."""


class ImageTooLarge(ImageError):
    """An image whose header declares more pixels than the cap (a decompression bomb)."""


class MemberTooLarge(ValueError):
    """A tar member larger than the per-member cap."""


def check_image(data: bytes | bytearray | memoryview, max_pixels: int = MAX_PIXELS,
                formats: tuple[str, ...] = IMAGE_FORMATS) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding pixels. Raises ImageTooLarge when
    width x height exceeds ``max_pixels`` (or PIL's own bomb check fires), ImageError when the
    header is unreadable or the format is not in ``formats``."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(bytes(data)), formats=list(formats)) as img:
                w, h = img.size
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image too large: {exc}") from None
    except Exception as exc:        # PIL raises many types on hostile headers
        raise ImageError(f"unreadable image header ({type(exc).__name__}: {exc})") from None
    if w <= 0 or h <= 0:
        raise ImageError(f"image declares {w}x{h} pixels")
    if w * h > max_pixels:
        raise ImageTooLarge(f"image declares {w}x{h} = {w * h:,} pixels, above the cap of {max_pixels:,}")
    return w, h


def open_image(data: bytes, max_pixels: int = MAX_PIXELS, formats: tuple[str, ...] = IMAGE_FORMATS):
    """Decode untrusted image bytes to an RGB PIL image: header checked first (check_image), then
    decoded. Raises ImageTooLarge or ImageError (both ValueError)."""
    from PIL import Image

    check_image(data, max_pixels, formats)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(bytes(data)), formats=list(formats))
            img.load()
            return img.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image too large: {exc}") from None
    except Exception as exc:
        raise ImageError(f"corrupt image: {type(exc).__name__}: {exc}") from None


MAX_HEADER_BYTES = 1 << 20               # the largest pax / GNU long-name header record read
MAX_HEADER_RUN = 8                       # extension records before one member (a real one has 1-2)


class _CappedTarInfo(tarfile.TarInfo):
    """A tar header whose extension records (pax, GNU long names) are refused above
    MAX_HEADER_BYTES, or when more than MAX_HEADER_RUN of them precede one member: tarfile reads a
    record whole before any member-size check can run (a 5-byte member could bring a 300 MB header
    into memory), and recurses once per record (thousands of tiny ones end in RecursionError)."""

    def _proc_member(self, tf):   # tarfile's dispatch on the header type (CPython 3.8-3.13)
        if self.type in _EXTENSION_TYPES:
            run = getattr(tf, "_winnow_header_run", 0) + 1
            if self.size > MAX_HEADER_BYTES or run > MAX_HEADER_RUN:
                raise tarfile.SubsequentHeaderError(   # tarfile turns it into ReadError: a corrupt tar
                    f"a {self.size:,}-byte extended header, above the cap of {MAX_HEADER_BYTES:,}"
                    if self.size > MAX_HEADER_BYTES else f"{run} extended headers before one member, above the cap of "
                                                         f"{MAX_HEADER_RUN}")
            tf._winnow_header_run = run
        else:
            tf._winnow_header_run = 0
        return super()._proc_member(tf)


_EXTENSION_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                    tarfile.SOLARIS_XHDTYPE)


def open_tar_stream(name: str | None = None, fileobj=None, mode: str = "r|") -> tarfile.TarFile:
    """An untrusted tar, read as a stream, with extension headers capped (a ReadError above
    MAX_HEADER_BYTES, as for any corrupt tar)."""
    return tarfile.open(name, mode, fileobj=fileobj, tarinfo=_CappedTarInfo)


def check_member_size(name: str, size: int, cap: int = MAX_MEMBER_BYTES) -> None:
    """Refuse a tar member above ``cap`` bytes before reading it (MemberTooLarge)."""
    if size > cap:
        raise MemberTooLarge(f"tar member {name!r} is {size:,} bytes, above the cap of {cap:,}")


def member_suffix(name: str) -> tuple[str, str]:
    """(key, suffix) of a tar member as webdataset groups it: the basename up to its first dot is
    the key (with the folder), the rest, lower-cased, the suffix (``a/b.JPG`` -> ``a/b``, ``jpg``;
    ``x.txt.gz`` -> ``x``, ``txt.gz``)."""
    folder, _, base = name.rpartition("/")
    key, _, suffix = base.partition(".")
    return (f"{folder}/{key}" if folder else key), suffix.lower()


def allowed_member(name: str, allowed: frozenset[str] = ALLOWED_SUFFIXES) -> bool:
    """Whether a tar member's whole suffix is on the allowlist (``x.jpg`` yes; ``x.pyd``,
    ``x.jpg.pyd``, ``x.txt.gz``, ``x.pth`` no)."""
    key, suffix = member_suffix(name)
    return bool(key) and suffix in allowed


def filter_sample(sample: dict, allowed: frozenset[str] = ALLOWED_SUFFIXES) -> dict:
    """A webdataset sample with only allowlisted members (and its ``__key__``/``__url__`` fields):
    map it before ``.decode()`` so no default decoder (pickle, torch.load, gzip) ever sees other
    members, e.g. ``wds.WebDataset(urls).map(filter_sample).decode("pil")``."""
    return {k: v for k, v in sample.items() if k.startswith("__") or k.lower() in allowed}


class TensorPreprocess:
    def __init__(self, preprocess_cfg: dict, device: str | torch.device = "cpu", max_pixels: int = MAX_PIXELS):
        self.max_pixels = max_pixels
        size = preprocess_cfg.get("size", 224)
        self.size = size if isinstance(size, int) else int(size[0])
        if preprocess_cfg.get("resize_mode", "shortest") != "shortest":
            raise ValueError(f"tensor decode supports resize_mode 'shortest' only, not {preprocess_cfg['resize_mode']}")
        self.device = torch.device(device)
        self.mean = torch.tensor(preprocess_cfg["mean"], device=self.device).view(3, 1, 1)
        self.std = torch.tensor(preprocess_cfg["std"], device=self.device).view(3, 1, 1)

    def decode(self, jpegs: list[torch.Tensor]) -> tuple[list[torch.Tensor | None], list[int]]:
        """Decode a batch of encoded JPEGs (uint8 tensors). Each header is checked first
        (check_image: JPEG only, at most ``max_pixels``), so a decompression bomb or a non-JPEG is
        quarantined before nvjpeg/torchvision allocate anything; a batch that fails is retried one
        image at a time so that one corrupt image is quarantined, not the batch. Returns the images
        (None where corrupt or refused) and the indices of those."""
        from torchvision.io import ImageReadMode, decode_jpeg

        out: list[torch.Tensor | None] = [None] * len(jpegs)
        bad, ok = [], []
        for i, j in enumerate(jpegs):
            try:
                check_image(j.detach().cpu().numpy().tobytes() if isinstance(j, torch.Tensor) else bytes(j),
                            self.max_pixels, ("JPEG",))
                ok.append(i)
            except ImageError:
                bad.append(i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # torchvision 0.29 deprecates its decoders for TorchCodec
            try:
                if ok:
                    for i, img in zip(ok, decode_jpeg([jpegs[i] for i in ok], mode=ImageReadMode.RGB, device=self.device)):
                        out[i] = img
            except RuntimeError:
                for i in ok:
                    try:
                        out[i] = decode_jpeg(jpegs[i], mode=ImageReadMode.RGB, device=self.device)
                    except RuntimeError:
                        out[i] = None
                        bad.append(i)
        return out, sorted(bad)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 CHW -> normalised float CHW of the model's input size."""
        from torchvision.transforms.v2 import functional as F

        img = F.resize(img.float(), self.size, interpolation=F.InterpolationMode.BICUBIC, antialias=True)
        img = F.center_crop(img, [self.size, self.size])
        return (img.div_(255).clamp_(0, 1) - self.mean) / self.std
