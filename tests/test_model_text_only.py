"""Text-only queries (`TextQuery`) follow the plain Qwen2 path: no fast tokens, no cross term."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2ForCausalLM

from model import TextQuery, VideoQuery
from model.prompt import build_prompt
from tests.support.random_model import random_frames

QUESTION = "Summarize: a person walks in, then a car parks."


@pytest.fixture(scope="module")
def plain_qwen2(tiny_vlm) -> Qwen2ForCausalLM:
    """transformers' Qwen2ForCausalLM holding the same weights (the hybrid layers' extras left out)."""
    network = tiny_vlm.network
    reference = Qwen2ForCausalLM(network.model.text_config).eval()
    state = {k: v for k, v in network.state_dict().items()
             if not k.startswith(("model.vision_tower.", "model.mm_projector.")) and ".cross_attn_" not in k}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} - set(state)
    return reference


def prompt_ids(vlm, question: str) -> torch.Tensor:
    ids = build_prompt(vlm.tokenizer, question, image=False)
    assert ids.after_image == []
    return torch.tensor([ids.before_image])


def test_text_prompt_has_no_image_spot(tiny_vlm):
    text = tiny_vlm.tokenizer.decode(prompt_ids(tiny_vlm, QUESTION)[0])
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")


def test_text_only_logits_equal_plain_qwen2(tiny_vlm, plain_qwen2):
    with torch.inference_mode():
        expected = plain_qwen2(prompt_ids(tiny_vlm, QUESTION)).logits[0, -1].float()
    got = tiny_vlm.next_token_logits(TextQuery(QUESTION))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_text_only_greedy_ids_equal_plain_qwen2_alone_and_batched_with_video(tiny_vlm, plain_qwen2):
    tokens = 12
    ids = prompt_ids(tiny_vlm, QUESTION)
    with torch.inference_mode():
        out = plain_qwen2.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                                   eos_token_id=tiny_vlm.stop_token_ids, pad_token_id=tiny_vlm.stop_token_ids[0])
    expected = [t for t in out[0, ids.shape[1]:].tolist()]
    while expected and expected[-1] in tiny_vlm.stop_token_ids:
        expected.pop()  # ours reports ids before the stop token

    (alone,) = tiny_vlm.generate([TextQuery(QUESTION)], max_new_tokens=tokens)
    assert alone.token_ids == expected
    video = VideoQuery(frames=random_frames(8), question="Describe the video.")
    video_alone, = tiny_vlm.generate([video], max_new_tokens=tokens)
    with_video, text_batched = tiny_vlm.generate([video, TextQuery(QUESTION)], max_new_tokens=tokens)
    assert text_batched.token_ids == expected
    assert with_video.token_ids == video_alone.token_ids  # the text row leaves the video row alone


def test_all_text_batch_has_no_slow_tokens(tiny_vlm):
    batch = tiny_vlm._batch([TextQuery(QUESTION), TextQuery("Another one.")], room_for_answer=4)
    assert batch.slow.states.shape[1] == 0
    assert (batch.token_types != 3).all()
