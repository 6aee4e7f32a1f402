"""Config, checkpoint loading in the official format, the full-size structure on meta."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model import CheckpointError, SlowFastConfig, SlowFastVLM, UnsupportedConfigError, VideoQuery
from model.checkpoint_folder import checkpoint_files
from model.random_checkpoint import RANDOM_CHECKPOINT_CONFIG, save_sharded
from model.released import RELEASED_7B_CONFIG
from tests.support.random_model import random_frames


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_shards(folder: Path, edit) -> None:
    """Rewrite the checkpoint as one file after `edit(state)`, keeping official names."""
    from safetensors.torch import load_file

    state = {}
    for file in checkpoint_files(folder):
        state |= load_file(str(file))
        file.unlink()
    (folder / "model.safetensors.index.json").unlink()
    edit(state)
    save_file(state, str(folder / "model.safetensors"))


def test_full_size_structure_on_meta_allocates_nothing():
    vlm = SlowFastVLM.from_config(RELEASED_7B_CONFIG, device="meta")
    keys = vlm.expected_checkpoint_keys()
    hybrid = sorted({int(k.split(".")[2]) for k in keys if "cross_attn_kv_proj" in k})
    assert hybrid == [0, 8, 16, 24]
    for layer in hybrid:
        prefix = f"model.layers.{layer}.self_attn."
        assert keys[prefix + "cross_attn_kv_proj.weight"] == (1024, 3584)
        assert keys[prefix + "cross_attn_kv_proj.bias"] == (1024,)
        assert keys[prefix + "cross_attn_gate_proj.0.weight"] == (1, 3584)
        assert keys[prefix + "cross_attn_gate_proj.0.bias"] == (1,)
        assert keys[prefix + "cross_attn_warm_up_gate"] == (1,)
    assert "model.layers.1.self_attn.cross_attn_kv_proj.weight" not in keys
    assert keys["model.mm_projector.0.weight"] == (3584, 3072)
    assert keys["model.mm_projector.2.weight"] == (3584, 3584)
    assert keys["model.layers.3.self_attn.k_proj.weight"] == (512, 3584)
    assert keys["model.layers.3.mlp.gate_proj.weight"] == (18944, 3584)
    assert keys["lm_head.weight"] == (152064, 3584)
    tower = "model.vision_tower.vision_tower."
    assert keys[tower + "stem.0.weight"] == (384, 3, 4, 4)
    assert keys[tower + "stages.2.blocks.29.weight"] == (1536,)  # layer scale, timm's gamma
    assert keys[tower + "stages.3.downsample.1.weight"] == (3072, 1536, 2, 2)
    assert keys[tower + "stages.3.blocks.2.mlp.fc1.weight"] == (12288, 3072)
    assert tower + "stages.3.blocks.3.mlp.fc1.weight" not in keys
    assert not any(".head." in k for k in keys)
    total = sum(torch.Size(shape).numel() for shape in keys.values())
    assert 8.0e9 < total < 9.0e9  # Qwen2-7B (7.6B) + ConvNeXt-XXL (~0.85B) + projector + cross layers
    assert all(p.is_meta for p in vlm.network.parameters())


def test_official_format_round_trip_gives_identical_outputs(tmp_path, tiny_model_dir):
    reference = SlowFastVLM.from_config(tiny_model_dir / "config.json", device="cpu")
    reference.tokenizer = SlowFastVLM.from_pretrained(tiny_model_dir).tokenizer
    folder = tmp_path / "roundtrip"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(tiny_model_dir / name, folder / name)
    state = reference.network.state_dict()
    assert set(state) == set(reference.expected_checkpoint_keys())
    save_sharded(state, folder, shards=3)

    loaded = SlowFastVLM.from_pretrained(folder, device="cpu")
    query = VideoQuery(frames=random_frames(8), question="What happens?")
    torch.testing.assert_close(loaded.next_token_logits(query), reference.next_token_logits(query), rtol=0, atol=0)
    assert loaded.generate([query], max_new_tokens=6) == reference.generate([query], max_new_tokens=6)


def test_defaults_are_fp32_on_cpu(tiny_vlm):
    assert tiny_vlm.device == torch.device("cpu") and tiny_vlm.dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in tiny_vlm.network.parameters())


def test_bf16_checkpoint_loads_into_requested_dtype(tmp_path, tiny_model_dir):
    folder = copy_checkpoint(tiny_model_dir, tmp_path / "bf16")
    edit_shards(folder, lambda state: state.update({k: v.to(torch.bfloat16) for k, v in state.items()}))
    vlm = SlowFastVLM.from_pretrained(folder, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in vlm.network.parameters()} == {torch.bfloat16}
    out = vlm.generate([VideoQuery(frames=random_frames(4), question="What happens?")], max_new_tokens=3)
    assert len(out[0].token_ids) == 3


def test_missing_and_unexpected_keys_are_listed(tmp_path, tiny_model_dir):
    folder = copy_checkpoint(tiny_model_dir, tmp_path / "broken")

    def break_state(state):
        del state["model.layers.2.self_attn.cross_attn_warm_up_gate"]
        state["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)

    edit_shards(folder, break_state)
    with pytest.raises(CheckpointError) as error:
        SlowFastVLM.from_pretrained(folder)
    message = str(error.value)
    assert "missing keys (1): ['model.layers.2.self_attn.cross_attn_warm_up_gate']" in message
    assert "unexpected keys (1): ['model.layers.9.mlp.up_proj.weight']" in message


def test_shape_mismatch_is_reported(tmp_path, tiny_model_dir):
    folder = copy_checkpoint(tiny_model_dir, tmp_path / "shape")
    edit_shards(folder, lambda state: state.update({"model.norm.weight": torch.ones(3)}))
    with pytest.raises(CheckpointError, match=r"model.norm.weight: checkpoint \(3,\) vs model \(64,\)"):
        SlowFastVLM.from_pretrained(folder)


def test_missing_folder_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match=f"checkpoint folder {missing} does not exist"):
        SlowFastVLM.from_pretrained(missing)


def test_hub_id_while_offline_says_what_was_tried(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    hub_id = "shi-labs/slowfast-video-mllm-qwen2-7b-convnext-576-frame64-s1t4"
    with pytest.raises(CheckpointError) as error:
        SlowFastVLM.from_pretrained(hub_id)
    message = str(error.value)
    assert f"tried local folder {tmp_path / hub_id} (does not exist)" in message
    assert f"hub id {hub_id!r}" in message


def test_folder_without_weights_is_reported(tmp_path, tiny_model_dir):
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder)
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json or model.safetensors"):
        SlowFastVLM.from_pretrained(folder)


@pytest.mark.parametrize(
    "field, value",
    [
        ("mm_vision_tower", "openai/clip-vit-large-patch14"),
        ("mm_projector_type", "linear"),
        ("cross_attn_implementation", "vanilla"),
        ("cross_attn_gating_type", "channel-wise-dynamic-sigmoid"),
    ],
)
def test_unsupported_config_values_are_named(field, value):
    with pytest.raises(UnsupportedConfigError, match=f"{field}={value!r} is not supported"):
        SlowFastConfig.from_source(RANDOM_CHECKPOINT_CONFIG | {"vocab_size": 512, field: value})


def test_invalid_config_value_names_field():
    with pytest.raises(UnsupportedConfigError, match=r"hidden_size='wide'"):
        SlowFastConfig.from_source(RANDOM_CHECKPOINT_CONFIG | {"vocab_size": 512, "hidden_size": "wide"})


def test_unknown_config_fields_are_kept_and_released_values_read():
    config = SlowFastConfig.from_source(RELEASED_7B_CONFIG | {"some_future_field": [1, 2]})
    assert config.to_dict()["some_future_field"] == [1, 2]
    assert config.to_dict()["mm_vision_select_layer"] == -2
    assert config.hybrid_layer_ids == [0, 8, 16, 24]
    assert config.tokens_per_frame == 81 and config.head_dim == 128
    assert config.vision_config.depths == [3, 4, 30, 3] and config.vision_config.dims[-1] == 3072
    text = config.text_config()
    assert text.rope_parameters["rope_theta"] == 1e6 and text.num_key_value_heads == 4


def test_random_checkpoint_command_line(tmp_path):
    target = tmp_path / "cli-random"
    subprocess.run([sys.executable, "-m", "model.random_checkpoint", str(target), "--seed", "3"], check=True, capture_output=True)
    config = json.loads((target / "config.json").read_text())
    assert config["model_type"] == "llava_qwen_slow_fast" and "vision_config" in config
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert "model.vision_tower.vision_tower.head.fc.weight" in index["weight_map"]  # unused head, ignored on load
    assert SlowFastVLM.from_pretrained(target).config.fast_token_temporal_stride == 4
