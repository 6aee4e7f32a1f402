"""The released 7B checkpoint's config.json fields (shi-labs/slowfast-video-mllm-qwen2-7b-convnext-576-frame64-s1t4),
for building its full-size structure without downloading it: on the meta device in tests,
with random weights in the model bench."""

from __future__ import annotations

from typing import Any

RELEASED_7B_CONFIG: dict[str, Any] = {
    "architectures": ["LlavaQwenSlowFastForCausalLM"],
    "model_type": "llava_qwen_slow_fast",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": 131072,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "mm_vision_tower": "convnext-576",
    "mm_projector_type": "mlp2x_gelu",
    "mm_hidden_size": 3072,
    "mm_video_pooling_stride": 2,
    "mm_vision_select_layer": -2,
    "image_aspect_ratio": "pad",
    "fast_token_spatial_stride": 1,
    "fast_token_temporal_stride": 4,
    "fast_token_temporal_sampling_stride": 1,
    "min_fast_frames": 16,
    "cross_attn_every_n_layers": 8,
    "cross_attn_implementation": "text-only-vanilla-flashattn",
    "cross_attn_gating_type": "whole-dynamic-tanh-warmup",
    "tokenizer_model_max_length": 32768,
    "torch_dtype": "bfloat16",
}
