"""A small random-weight Slow-Fast checkpoint in the official format, for tests and benches.

Its weights are random: it is not the trained synthetic-world model (`world`).
`python -m model.random_checkpoint DIR` (or `write_random_checkpoint(DIR)`) writes config.json with the
released strides and field names, a small `vision_config` for the tower, sharded
safetensors with an index and official key names (plus an unused classifier head, as
timm files carry), generation_config.json and a byte-level BPE tokenizer trained on
the fly. Loading it goes through exactly the same code as a released checkpoint.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .config import SlowFastConfig
from .modeling import SlowFastForCausalLM

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_VOCAB_SIZE = 512
_CORPUS = """
You are a helpful assistant. Please describe this video in detail.
A person walks across the loading bay and opens the door. A truck arrives at the gate.
Is anyone in the loading bay? Yes. No. There is a car parked near the entrance.
The camera shows an empty street at night with rain. A dog runs after a ball in the park.
Two people talk near a table, then one of them leaves the room. The light turns red.
What happens at the end of the clip? The video shows a kitchen where someone cooks.
Describe what changed in the last seconds. Nothing moved. A cat jumps onto the sofa.
""".strip().splitlines()

# Released strides and layout, at toy widths. image_size stays 576 so windows have the
# released token counts (18x18 grid -> 81 tokens per frame).
RANDOM_CHECKPOINT_CONFIG: dict[str, Any] = {
    "architectures": ["LlavaQwenSlowFastForCausalLM"],
    "model_type": "llava_qwen_slow_fast",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": 131072,
    "attention_dropout": 0.0,
    "image_aspect_ratio": "pad",
    "mm_patch_merge_type": "flat",
    "mm_vision_select_layer": -2,
    "mm_vision_tower": "convnext-576",
    "mm_projector_type": "mlp2x_gelu",
    "mm_hidden_size": 32,
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
    "mm_video_pooling_stride": 2,
    "fast_token_spatial_stride": 1,
    "fast_token_temporal_stride": 4,
    "fast_token_temporal_sampling_stride": 1,
    "min_fast_frames": 16,
    "cross_attn_every_n_layers": 2,
    "cross_attn_min_layer_depth": 0,
    "cross_attn_max_layer_depth": 4,
    "cross_attn_implementation": "text-only-vanilla-flashattn",
    "cross_attn_gating_type": "whole-dynamic-tanh-warmup",
    "tokenizer_model_max_length": 8192,
    "tokenizer_padding_side": "right",
    "torch_dtype": "float32",
    "vision_config": {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32], "norm_eps": 1e-5, "image_size": 576},
}


def write_tokenizer(folder: Path, corpus: list[str] = _CORPUS, vocab_size: int = TOKENIZER_VOCAB_SIZE) -> dict[str, int]:
    """A byte-level BPE tokenizer trained on `corpus`, saved as a Qwen2 folder ships it."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer.model.save(str(folder))  # vocab.json + merges.txt, as Qwen2 folders ship them
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    special = {
        str(ids[token]): {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True,
        }
        for token in SPECIAL_TOKENS
    }
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": special,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": RANDOM_CHECKPOINT_CONFIG["tokenizer_model_max_length"],
        "padding_side": "right",
        "split_special_tokens": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return ids | {"vocab_size": tokenizer.get_vocab_size()}


_NEAR_ONE = re.compile(r"norm\.weight$|layernorm\.weight$|stem\.1\.weight$|downsample\.0\.weight$|blocks\.\d+\.weight$")


def _randomize(network: SlowFastForCausalLM, seed: int) -> None:
    """Seeded weights; warm-up gates non-zero so the cross-attention is live."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if name.endswith("cross_attn_warm_up_gate"):
                param.copy_(0.5 + 0.5 * torch.rand(param.shape, generator=generator))
            elif _NEAR_ONE.search(name):  # norm scales and ConvNeXt layer scales
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                fan_in = param[0].numel() if param.ndim > 1 else param.numel()
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)


def _classifier_head(width: int, seed: int) -> dict[str, torch.Tensor]:
    """timm ConvNeXt files carry a head the tower does not use; keep one to exercise that."""
    generator = torch.Generator().manual_seed(seed + 1)
    prefix = "model.vision_tower.vision_tower.head."
    return {
        prefix + "norm.weight": torch.ones(width),
        prefix + "norm.bias": torch.zeros(width),
        prefix + "fc.weight": torch.randn(10, width, generator=generator),
        prefix + "fc.bias": torch.zeros(10),
    }


def save_sharded(state: dict[str, torch.Tensor], folder: Path, shards: int = 2) -> None:
    """safetensors shards + model.safetensors.index.json, as Hugging Face writes them."""
    names = sorted(state)
    per_shard = -(-len(names) // shards)
    weight_map, total = {}, 0
    for index in range(shards):
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n].contiguous() for n in names[index * per_shard : (index + 1) * per_shard]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map |= {n: file for n in part}
        total += sum(t.numel() * t.element_size() for t in part.values())
    index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))


def write_checkpoint(folder: Path, network: SlowFastForCausalLM, config_dict: dict[str, Any], token_ids: dict[str, int],
                     extra_tensors: dict[str, torch.Tensor] | None = None, shards: int = 2) -> Path:
    """config.json, generation_config.json and safetensors shards of `network` in `folder`."""
    state = {name: tensor.detach() for name, tensor in network.state_dict().items()} | (extra_tensors or {})
    save_sharded(state, folder, shards)
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2))
    generation_config = {
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": [token_ids["<|im_end|>"], token_ids["<|endoftext|>"]],
        "pad_token_id": token_ids["<|endoftext|>"],
    }
    (folder / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    return folder


def config_with_tokens(base: dict[str, Any], token_ids: dict[str, int], **overrides: Any) -> dict[str, Any]:
    """config.json fields: `base`, the tokenizer's vocabulary size and special ids, `overrides`."""
    return base | {
        "vocab_size": token_ids["vocab_size"],
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
    } | overrides


def write_random_checkpoint(folder: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a small random checkpoint folder; `overrides` replace config.json fields."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    token_ids = write_tokenizer(folder)
    config_dict = config_with_tokens(RANDOM_CHECKPOINT_CONFIG, token_ids, **overrides)
    config = SlowFastConfig.from_source(config_dict)
    torch.manual_seed(seed)
    network = SlowFastForCausalLM(config)
    _randomize(network, seed)
    return write_checkpoint(folder, network, config_dict, token_ids,
                            extra_tensors=_classifier_head(config.vision_config.dims[-1], seed))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.random_checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where to write the checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_random_checkpoint(args.folder, seed=args.seed))


if __name__ == "__main__":
    main()
