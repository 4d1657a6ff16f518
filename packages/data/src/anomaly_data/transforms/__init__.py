"""Turn decoded images and masks into fixed-size tensors.

Images are resized bilinearly with antialiasing (so downscaling averages instead of aliasing,
the way Pillow does); masks are binarized first and resized with exact nearest-neighbour
sampling, so they stay boolean and keep their alignment with the image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F  # the conventional alias

__all__ = ["image_to_tensor", "mask_to_tensor", "resize_image", "resize_mask"]


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """Convert an (H, W, 3) uint8 RGB array to a (3, H, W) float32 tensor in [0, 1]."""
    # Converted in numpy: on a busy CPU each small torch op pays the wake-up of its
    # intra-op thread pool, which costs more than the arithmetic itself.
    array = np.asarray(image)
    out = np.empty((3, *array.shape[:2]), dtype=np.float32)
    np.divide(array.transpose(2, 0, 1), np.float32(255.0), out=out)
    return torch.from_numpy(out)


def mask_to_tensor(mask: np.ndarray) -> torch.Tensor:
    """Convert an (H, W) array to an (H, W) bool tensor, True where the value is nonzero."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(mask) != 0))


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize an image bilinearly with antialiasing.

    Args:
        image: (3, H, W) float32 in [0, 1].
        size: Target ``(height, width)``.

    Returns:
        (3, height, width) float32 in [0, 1].
    """
    if tuple(image.shape[-2:]) == size:
        return image
    resized = F.interpolate(
        image.unsqueeze(0), size=size, mode="bilinear", align_corners=False, antialias=True
    )
    # Antialiased bilinear kernels overshoot slightly at sharp edges.
    return resized.squeeze(0).clamp_(0.0, 1.0)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a binary mask with exact nearest-neighbour sampling.

    Args:
        mask: (H, W) bool, True on defective pixels.
        size: Target ``(height, width)``.

    Returns:
        (height, width) bool.
    """
    if tuple(mask.shape) == size:
        return mask
    # "nearest-exact" samples pixel centres; plain "nearest" shifts masks by half a pixel.
    resized = F.interpolate(mask[None, None].to(torch.uint8), size=size, mode="nearest-exact")
    return resized[0, 0].bool()
