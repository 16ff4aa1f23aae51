"""open_clip models: our configs registered from ``configs/models``, loaded from a pretrained tag,
a local checkpoint, or randomly initialised (the in-pipeline scorer before it is trained).

Offline, a pretrained tag whose weights are not cached fails at once with how to provide them.
"""
from __future__ import annotations

import functools
from pathlib import Path

from winnow.errors import WinnowError
from winnow.config import CONFIGS


class ModelError(WinnowError, RuntimeError):
    pass


@functools.cache
def register_configs() -> list[str]:
    import open_clip

    open_clip.add_model_config(CONFIGS / "models")
    return sorted(p.stem for p in (CONFIGS / "models").glob("*.json"))


def resolve_weights(pretrained: str | None) -> str | None:
    """An ``s3://`` checkpoint is downloaded into ``.winnow/cache/s3/<bucket>/<key>`` (atomic), again
    whenever the object's ETag changes;
    tags and local paths pass through. A bucket or key that would resolve outside the cache
    (``..``, ``prefix//abs/path``) is refused (ModelError) before anything is read or written."""
    from winnow import s3
    from winnow.io import CACHE, UnsafePath, atomic_file, safe_join

    if pretrained and s3.is_s3(pretrained):
        bucket, key = s3.split(pretrained)
        try:
            dest = safe_join(CACHE / "s3", bucket, key, what="S3 location")
        except UnsafePath as exc:
            raise ModelError(f"scorer weights {pretrained}: {exc}") from None
        # fetched again when the object changed (its ETag): weights replaced in place are not the cached ones
        seen = dest.with_name(f".{dest.name}.etag")
        try:
            parent, name = pretrained.rsplit("/", 1)
            etag = (s3.list_objects(parent, recursive=False).get(name) or (None, None))[1]
            if etag is None:
                raise ModelError(f"scorer weights {pretrained} cannot be fetched: no such object")
            if not (dest.is_file() and seen.is_file() and seen.read_text() == etag):
                s3.download(pretrained, dest)
                with atomic_file(seen) as tmp:
                    tmp.write_text(etag)
        except s3.S3Error as exc:
            raise ModelError(f"scorer weights {pretrained} cannot be fetched: {exc}") from None
        return str(dest)
    return pretrained


def check_known(model: str, what: str = "scorer.model") -> None:
    """An open_clip architecture (or one of configs/models), else a ModelError naming ``what``."""
    import open_clip

    register_configs()
    if model not in open_clip.list_models():
        raise ModelError(f"{what}: unknown open_clip model '{model}'; see open_clip.list_models() or add "
                         f"a config to {CONFIGS / 'models'}")


def load(model: str, pretrained: str | None = None, device: str = "cpu"):
    """Return ``(model.eval(), preprocess, tokenizer)``. ``pretrained``: None, an open_clip tag, a
    local checkpoint path or an ``s3://`` URI of one."""
    import pickle

    import open_clip
    from safetensors import SafetensorError

    check_known(model, "model")
    pretrained = resolve_weights(pretrained)
    if pretrained and not Path(pretrained).exists() and "://" not in pretrained:
        tags = [t for m, t in open_clip.list_pretrained() if m == model]
        if pretrained not in tags and ("/" in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors"))):
            raise ModelError(f"checkpoint not found: {pretrained}")
    try:
        m, _, preprocess = open_clip.create_model_and_transforms(
            model, pretrained=pretrained, device=device, weights_only=True)
    except RuntimeError as exc:
        if pretrained and "ownload" in str(exc):
            raise ModelError(
                f"pretrained weights '{pretrained}' for {model} are not cached and this machine is offline "
                f"(HF_HUB_OFFLINE=1). Provide them: download on a connected machine into the Hugging Face "
                f"cache (HF_HOME) and copy it here, or set `pretrained:` to a local checkpoint path.") from None
        if pretrained and Path(pretrained).exists() and "loading state_dict" in str(exc):   # another model's
            raise _unloadable(pretrained, model, exc) from None
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, SafetensorError) as exc:
        # what a file that is not this model's tensors raises (weights_only refusing an object,
        # garbage bytes, a foreign state dict); not an out-of-memory or a bad device
        if pretrained and Path(pretrained).exists():
            raise _unloadable(pretrained, model, exc) from None
        raise
    return m.eval(), preprocess, open_clip.get_tokenizer(model)


def _unloadable(path: str, model: str, exc: Exception) -> ModelError:
    # torch's own message suggests weights_only=False: never, for a file from elsewhere
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return ModelError(f"checkpoint {path} does not load as {model} weights ({type(exc).__name__}: {first[:300]}). "
                      f"winnow loads tensors only (torch.load weights_only=True, or safetensors): a checkpoint "
                      f"holding other objects, or a corrupt file, is refused.")


# DataComp's metadata names the OpenAI CLIP features by model: l14_img, b32_txt, ...
DATACOMP_NAMES = {("ViT-L-14", "openai"): "l14", ("ViT-B-32", "openai"): "b32"}


def embedding_name(model: str, pretrained: str | None, name: str = "auto") -> str:
    """The prefix of a scorer's embedding keys (``<name>_img``, ``<name>_img_flip``, ``<name>_txt``)
    and score columns: DataComp's for its models, ``scorer`` for the in-pipeline network, else
    ``<model>_<weights>`` made identifier-safe."""
    import re

    if name != "auto":
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ModelError(f"scorer.name '{name}' must be lowercase letters, digits and _")
        return name
    if pretrained is None:
        return "scorer"
    if (model, pretrained) in DATACOMP_NAMES:
        return DATACOMP_NAMES[(model, pretrained)]
    weights = Path(pretrained).stem if ("/" in pretrained or "." in pretrained) else pretrained
    return re.sub(r"[^a-z0-9]+", "_", f"{model}_{weights}".lower()).strip("_")
