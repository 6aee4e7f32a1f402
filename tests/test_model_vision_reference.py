"""The ConvNeXt vision tower against a reference forward written here from the ConvNeXt
definition (Liu et al. 2022, timm's layout; the CLIP ConvNeXt-XXLarge the Slow-Fast model
uses), reading the same official-name weights: stem 4x4 conv stride 4 + channels-first
LayerNorm; stages 1.. start with LayerNorm + 2x2 conv stride 2; each block is 7x7 depthwise
conv -> LayerNorm over channels -> Linear 4x -> exact (erf) GELU -> Linear -> per-channel
layer scale -> + block input; the output is the raw last-stage map as tokens (no final
norm, pooling or head). The norm and GELU are written out by hand, not taken from torch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from model.checkpoint_folder import checkpoint_files
from model.config import VisionConfig
from model.vision import VisionTower

TOWER = "model.vision_tower.vision_tower."
STEM_STRIDE, DOWNSAMPLE_STRIDE, KERNEL, MLP_RATIO = 4, 2, 7, 4
NORM_EPS = 1e-5  # every LayerNorm of the CLIP ConvNeXt (timm's ConvNeXt default is 1e-6)


def layer_norm_last(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased, as LayerNorm
    return (x - mean) / torch.sqrt(variance + NORM_EPS) * weight + bias


def layer_norm_channels(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return layer_norm_last(x.permute(0, 2, 3, 1), weight, bias).permute(0, 3, 1, 2)


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def reference_tower(state: dict[str, torch.Tensor], depths: list[int], pixels: torch.Tensor) -> torch.Tensor:
    """[N, 3, S, S] -> [N, (S/32)^2, dims[-1]] from official-name weights."""
    def w(name: str) -> torch.Tensor:
        return state[TOWER + name]

    x = F.conv2d(pixels, w("stem.0.weight"), w("stem.0.bias"), stride=STEM_STRIDE)
    x = layer_norm_channels(x, w("stem.1.weight"), w("stem.1.bias"))
    for stage, depth in enumerate(depths):
        if stage:
            down = f"stages.{stage}.downsample."
            x = layer_norm_channels(x, w(down + "0.weight"), w(down + "0.bias"))
            x = F.conv2d(x, w(down + "1.weight"), w(down + "1.bias"), stride=DOWNSAMPLE_STRIDE)
        for index in range(depth):
            block = f"stages.{stage}.blocks.{index}."
            y = F.conv2d(x, w(block + "conv_dw.weight"), w(block + "conv_dw.bias"), padding=KERNEL // 2,
                         groups=x.shape[1])
            y = layer_norm_last(y.permute(0, 2, 3, 1), w(block + "norm.weight"), w(block + "norm.bias"))
            y = gelu_erf(y @ w(block + "mlp.fc1.weight").T + w(block + "mlp.fc1.bias"))
            y = y @ w(block + "mlp.fc2.weight").T + w(block + "mlp.fc2.bias")
            x = x + (y * w(block + "weight")).permute(0, 3, 1, 2)  # layer scale: official name `weight`
    return x.flatten(2).transpose(1, 2)


def official_tower_weights(depths: list[int], dims: list[int], seed: int) -> dict[str, torch.Tensor]:
    """Random weights under the official names, none at its default init: norm scales and
    biases away from 1 and 0, layer scales of both signs. The depthwise convolutions are
    small, so each block's norm sees a low-variance input and its eps shows in the output."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * scale

    state: dict[str, torch.Tensor] = {}

    def norm(name: str, dim: int) -> None:
        state[name + "weight"], state[name + "bias"] = 1.0 + randn(dim, scale=0.3), randn(dim, scale=0.2)

    def linear(name: str, out: int, fan_in: int, *kernel: int, scale: float = 1.0) -> None:
        state[name + "weight"] = randn(out, fan_in, *kernel, scale=scale / math.sqrt(fan_in * math.prod(kernel)))
        state[name + "bias"] = randn(out, scale=0.1 * scale)

    linear(TOWER + "stem.0.", dims[0], 3, STEM_STRIDE, STEM_STRIDE)
    norm(TOWER + "stem.1.", dims[0])
    for stage, (depth, dim) in enumerate(zip(depths, dims)):
        if stage:
            norm(TOWER + f"stages.{stage}.downsample.0.", dims[stage - 1])
            linear(TOWER + f"stages.{stage}.downsample.1.", dim, dims[stage - 1], DOWNSAMPLE_STRIDE, DOWNSAMPLE_STRIDE)
        for index in range(depth):
            block = TOWER + f"stages.{stage}.blocks.{index}."
            linear(block + "conv_dw.", dim, 1, KERNEL, KERNEL, scale=0.03)
            norm(block + "norm.", dim)
            linear(block + "mlp.fc1.", MLP_RATIO * dim, dim)
            linear(block + "mlp.fc2.", dim, MLP_RATIO * dim)
            state[block + "weight"] = randn(dim, scale=0.5)
    return state


# float32 as the model runs on CPU; float64 leaves only the arithmetic itself, so a tolerance
# that tight also catches what float32 rounding would cover (an eps off by 1e-5 in a norm whose
# input varies a lot).
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)],
                         ids=["float32", "float64"])
def test_tower_equals_a_reference_convnext_forward_on_the_same_official_weights(dtype, tolerance):
    config = VisionConfig(depths=[2, 1, 1, 2], dims=[8, 12, 16, 24], image_size=96)  # the default eps, as released
    state = {name: t.to(dtype) for name, t in official_tower_weights(config.depths, config.dims, seed=0).items()}
    tower = VisionTower(config).to(dtype)
    tower.load_state_dict({name.removeprefix("model.vision_tower."): t for name, t in state.items()}, strict=True)
    pixels = torch.randn(2, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(1))
    pixels = pixels.to(dtype)
    with torch.no_grad():
        got = tower(pixels)
    expected = reference_tower(state, config.depths, pixels)
    assert got.shape == expected.shape == (2, 3 * 3, 24) and got.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def test_the_loaded_tiny_checkpoint_tower_equals_the_reference_on_its_file_weights(tiny_model_dir, tiny_vlm):
    """Through the real loader: the tensors in the safetensors files, by their official names,
    give the reference's output, so no weight lands in the wrong place."""
    state: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(tiny_model_dir):
        state |= {name: t for name, t in load_file(str(file)).items() if name.startswith(TOWER)}
    vision = tiny_vlm.config.vision_config
    pixels = torch.randn(1, 3, vision.image_size, vision.image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = tiny_vlm.network.model.vision_tower(pixels.to(tiny_vlm.dtype))
    expected = reference_tower({k: t.float() for k, t in state.items()}, vision.depths, pixels)
    assert got.shape == (1, vision.grid_size**2, vision.dims[-1])
    torch.testing.assert_close(got.float(), expected, rtol=1e-5, atol=1e-5)
