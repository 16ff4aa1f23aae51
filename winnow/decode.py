"""JPEG decode and open_clip preprocessing as tensor ops, on the GPU (nvjpeg through torchvision)
or the CPU: the alternative to PIL decode in DataLoader workers when the host's cores are the
bottleneck. The preprocessing follows the model's ``preprocess_cfg`` (open_clip's default "shortest"
resize: bicubic resize of the short side with antialiasing, centre crop, normalise); results match
the PIL path up to resampling differences.
"""
from __future__ import annotations

import warnings

import torch


class TensorPreprocess:
    def __init__(self, preprocess_cfg: dict, device: str | torch.device = "cpu"):
        size = preprocess_cfg.get("size", 224)
        self.size = size if isinstance(size, int) else int(size[0])
        if preprocess_cfg.get("resize_mode", "shortest") != "shortest":
            raise ValueError(f"tensor decode supports resize_mode 'shortest' only, not {preprocess_cfg['resize_mode']}")
        self.device = torch.device(device)
        self.mean = torch.tensor(preprocess_cfg["mean"], device=self.device).view(3, 1, 1)
        self.std = torch.tensor(preprocess_cfg["std"], device=self.device).view(3, 1, 1)

    def decode(self, jpegs: list[torch.Tensor]) -> tuple[list[torch.Tensor | None], list[int]]:
        """Decode a batch of encoded JPEGs (uint8 tensors); a batch that fails is retried one image
        at a time so that one corrupt image is quarantined, not the batch. Returns the images
        (None where corrupt) and the indices of the corrupt ones."""
        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # torchvision 0.29 deprecates its decoders for TorchCodec
            try:
                return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device)), []
            except RuntimeError:
                out, bad = [], []
                for i, j in enumerate(jpegs):
                    try:
                        out.append(decode_jpeg(j, mode=ImageReadMode.RGB, device=self.device))
                    except RuntimeError:
                        out.append(None)
                        bad.append(i)
                return out, bad

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 CHW -> normalised float CHW of the model's input size."""
        from torchvision.transforms.v2 import functional as F

        img = F.resize(img.float(), self.size, interpolation=F.InterpolationMode.BICUBIC, antialias=True)
        img = F.center_crop(img, [self.size, self.size])
        return (img.div_(255).clamp_(0, 1) - self.mean) / self.std
