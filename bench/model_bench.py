"""Model throughput: preprocess, encode_frames, prefill, decode.

Each figure comes with a baseline measured in the same run:
- preprocess: ours (torch, batched) vs transformers' CLIPImageProcessor on PIL images;
- decode: cached decode steps vs recomputing the whole sequence without cache.

    python bench/model_bench.py                      # tiny random model on CPU
    python bench/model_bench.py --full-size          # 7B architecture, random bf16 weights (GPU)
    python bench/model_bench.py --model PATH         # a real checkpoint folder
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import SlowFastVLM, VideoQuery  # noqa: E402
from model import generation  # noqa: E402
from model.tiny import write_tiny_model  # noqa: E402

QUESTION = "Please describe this video in detail."


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Best-of-N wall time in seconds after one warm-up call."""
    fn()
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def load(args: argparse.Namespace) -> SlowFastVLM:
    if args.full_size:
        from tests.test_model_loading import RELEASED_7B_CONFIG

        tokenizer_dir = write_tiny_model(Path(tempfile.mkdtemp()) / "tok")
        vlm = SlowFastVLM.from_config(RELEASED_7B_CONFIG, device=args.device or "cuda", dtype=torch.bfloat16)
        vlm.tokenizer = SlowFastVLM.from_pretrained(tokenizer_dir).tokenizer  # token ids only matter for length
        return vlm
    path = args.model or write_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    return SlowFastVLM.from_pretrained(path, device=args.device)


def bench_preprocess(vlm: SlowFastVLM, frames: np.ndarray, repeats: int) -> dict:
    from PIL import Image
    from transformers import CLIPImageProcessor

    from model.preprocess import CLIP_MEAN, CLIP_STD

    size = vlm.config.image_size
    processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=3,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    ours = timed(lambda: vlm.preprocess(frames), vlm.device, repeats)
    pil = timed(lambda: processor([Image.fromarray(f) for f in frames], return_tensors="pt"), vlm.device, 1)
    return {
        "preprocess_fps": len(frames) / ours,
        "clip_processor_fps": len(frames) / pil,
        "preprocess_speedup_vs_clip_processor": pil / ours,
    }


def bench_llm(vlm: SlowFastVLM, features: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    query = VideoQuery(features=features, question=QUESTION)
    batch = vlm._batch([query], room_for_answer=new_tokens)
    prompt_tokens = batch.valid.shape[1]
    prefill = timed(lambda: generation.prefill_logits(vlm.network, vlm._batch([query], 1)), vlm.device, repeats)
    settings = generation.SamplingSettings(max_new_tokens=new_tokens)
    run = lambda: generation.generate(vlm.network, vlm._batch([query], new_tokens), settings, [])  # noqa: E731
    total = timed(run, vlm.device, repeats)
    decode_s = max(total - prefill, 1e-9)
    response = torch.tensor([run()[0].token_ids], device=vlm.device)

    def uncached():  # baseline: every step recomputes prompt + answer so far
        for step in range(1, new_tokens):
            generation.logits_without_cache(vlm.network, vlm._batch([query], 1), response[:, :step], False)

    uncached_s = timed(uncached, vlm.device, 1)
    return {
        "prompt_tokens": prompt_tokens,
        "slow_tokens": int(batch.slow.valid.sum()),
        "prefill_ms": prefill * 1e3,
        "decode_tokens_per_s": (new_tokens - 1) / decode_s,
        "uncached_decode_tokens_per_s": (new_tokens - 1) / uncached_s,
        "decode_speedup_vs_uncached": uncached_s / decode_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: a tiny random model)")
    parser.add_argument("--full-size", action="store_true", help="7B architecture with random bf16 weights")
    parser.add_argument("--device", default=None)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--input-size", default="720x1280", help="HxW of the raw frames fed to preprocess")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    vlm = load(args)
    height, width = (int(v) for v in args.input_size.split("x"))
    frames = np.random.default_rng(0).integers(0, 256, (args.frames, height, width, 3), dtype=np.uint8)

    results = {"device": device_name(vlm.device), "dtype": str(vlm.dtype), "attn": vlm.network.attn_implementation,
               "frames": args.frames}
    results |= bench_preprocess(vlm, frames, args.repeats)
    pixels = vlm.preprocess(frames)
    encode = timed(lambda: vlm.encode_frames(pixels), vlm.device, args.repeats)
    results["encode_fps"] = args.frames / encode
    results |= bench_llm(vlm, vlm.encode_frames(pixels), args.new_tokens, args.repeats)
    if vlm.device.type == "cuda":
        results["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(vlm.device) / 2**30
    for key, value in results.items():
        print(f"{key:>36}: {value:.2f}" if isinstance(value, float) else f"{key:>36}: {value}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
