"""The qwen_1_5 chat prompt with the `<image>` spot."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ModelInputError

if TYPE_CHECKING:  # the prompt's facts are read where transformers is not loaded (pipeline config, CLI)
    from transformers import PreTrainedTokenizerBase

IMAGE_PLACEHOLDER = "<image>"
SYSTEM_PROMPT = "You are a helpful assistant."
CHAT_TEMPLATE = (
    "<|im_start|>system\n{system}<|im_end|>\n"
    "<|im_start|>user\n" + IMAGE_PLACEHOLDER + "\n{question}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
# Without an image the user turn is the question alone (the official text-only prompt).
TEXT_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(IMAGE_PLACEHOLDER + "\n", "")
END_OF_TURN = "<|im_end|>"
# The question that asks for a caption of the video.
CAPTION_PROMPT = "Please describe this video in detail."
# The model's own bound on the text of one prompt, whoever builds it: a caller's question, or a
# longer prompt made of many captions (a summary). It keeps tokenization and the context bounded;
# callers that face users keep a lower limit of their own.
MAX_PROMPT_CHARS = 16_000


@dataclass(frozen=True)
class PromptIds:
    """Token ids before and after the spot where the fast visual tokens go."""

    before_image: list[int]
    after_image: list[int]


def build_prompt(
    tokenizer: PreTrainedTokenizerBase, question: str, system: str = SYSTEM_PROMPT, image: bool = True
) -> PromptIds:
    """Prompt ids around the `<image>` spot; with `image=False` the text-only prompt (all in `before_image`)."""
    if not isinstance(question, str):
        raise ModelInputError(f"question must be a string, got {type(question).__name__}")
    if not question.strip():
        raise ModelInputError("question is empty")
    if len(question) > MAX_PROMPT_CHARS:
        raise ModelInputError(f"question is {len(question)} characters long; the limit is {MAX_PROMPT_CHARS}")
    if IMAGE_PLACEHOLDER in question:
        raise ModelInputError(f"question must not contain the {IMAGE_PLACEHOLDER!r} placeholder")
    if not image:
        text = TEXT_CHAT_TEMPLATE.format(system=system, question=question)
        return PromptIds(before_image=tokenizer(text, add_special_tokens=False)["input_ids"], after_image=[])
    # <image> is not a vocabulary token: tokenize the text on either side of it.
    before, after = CHAT_TEMPLATE.format(system=system, question=question).split(IMAGE_PLACEHOLDER)
    return PromptIds(
        before_image=tokenizer(before, add_special_tokens=False)["input_ids"],
        after_image=tokenizer(after, add_special_tokens=False)["input_ids"],
    )
