"""CLIP-style pre-processing in torch, batched, on the model's device.

Mirrors what the official code gets from CLIPImageProcessor on PIL images: shortest
edge to `size` (bicubic, antialiased like PIL, rounded back to uint8 levels), center
crop, scale to [0, 1], normalise.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ModelInputError

# CLIP normalisation, fixed by the vision tower's pretraining (not carried by config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def as_frame_tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Validate uint8 RGB frames [T, H, W, 3] (or one [H, W, 3]); return a torch view."""
    if isinstance(frames, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(frames))
    elif isinstance(frames, torch.Tensor):
        tensor = frames
    else:
        raise ModelInputError(f"frames must be a numpy array or torch tensor, got {type(frames).__name__}")
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 4:
        raise ModelInputError(f"frames must have shape [T, H, W, 3], got {tuple(tensor.shape)}")
    if tensor.dtype != torch.uint8:
        raise ModelInputError(f"frames must be uint8 RGB, got dtype {tensor.dtype}")
    if tensor.shape[-1] != 3:
        raise ModelInputError(f"frames must have 3 channels (RGB) in the last axis, got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0 or tensor.shape[2] == 0:
        raise ModelInputError(f"frames are empty: shape {tuple(tensor.shape)}")
    return tensor


def resized_shape(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """Output size of a shortest-edge resize, truncating like transformers does."""
    short, long = (height, width) if height <= width else (width, height)
    new_long = int(shortest_edge * long / short)
    return (shortest_edge, new_long) if height <= width else (new_long, shortest_edge)


def preprocess_frames(
    frames: np.ndarray | torch.Tensor,
    size: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> normalised float [T, 3, size, size] on `device`."""
    pixels = as_frame_tensor(frames).to(device=device, non_blocking=True).permute(0, 3, 1, 2)
    height, width = pixels.shape[-2:]
    new_h, new_w = resized_shape(height, width, size)
    if (new_h, new_w) != (height, width):
        pixels = _resize_bicubic(pixels, (new_h, new_w))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    pixels = pixels[..., top : top + size, left : left + size].float()
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1) * 255
    return ((pixels - mean) / std).to(dtype)


def _resize_bicubic(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bicubic resize of uint8 NCHW, result rounded to uint8 like PIL's."""
    if pixels.device.type == "cpu":
        # torch's uint8 channels-last kernel: several times faster than float on CPU.
        resized = F.interpolate(
            pixels.contiguous(memory_format=torch.channels_last), size=size, mode="bicubic", antialias=True
        )
        return resized.contiguous()
    resized = F.interpolate(pixels.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    return resized.round().clamp(0, 255)
