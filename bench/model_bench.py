"""Model throughput, each figure next to a baseline measured in the same run on the same device.

    python -m bench.model_bench --tiny          # tiny random-weight model, CPU, about a minute
    python -m bench.model_bench --full-size     # 7B architecture, random bf16 weights, one GPU, <= 8 minutes
    python -m bench.model_bench --model PATH    # a real checkpoint folder
    python -m bench.model_bench --smoke         # the tiny model at the smallest shapes, compiled with inductor on
                                                # CPU too (the CUDA default's code paths), minutes: the suite's check

Sections, each printed as it finishes (ratios are ours / baseline, > 1 is better for rates,
< 1 for times):
- start-up (only when named in --sections, as --smoke does): a model worker's start (model
  load + warm-up of the decode rows a `batch_size` of the largest batch can need) in a new
  process with an empty compile cache, then in another with the cache the first filled; the
  rest of the bench then uses that cache;
- parity (CUDA only): the tiny official-format checkpoint in fp32 on CUDA against its CPU
  eager output: logit difference and greedy ids, eager and compiled decode;
- decode ms/step (median step interval) at each batch size: ours eager (static cache, uncompiled step) and ours
  compiled (CUDA graphs, the CUDA default) next to transformers' `Qwen2ForCausalLM` with the
  same shapes and random weights: `generate` with its dynamic cache and with
  `cache_implementation="static"` (which transformers compiles on CUDA); then our step with
  each decode attention backend the device runs (sdpa, flex, flash where flash-attn is
  installed; compiled when the bench compiles), with its time against sdpa's in the same run;
- preprocess frames/s (720p frames -> 576), against transformers' CLIPImageProcessor on PIL;
- tower frames/s, eager and compiled (when compiling: CUDA's default);
- per window (encode `stride` new frames per window + prefill + `new_tokens` tokens) at each
  batch size, against the authors' way (all window frames encoded, one clip at a time,
  eager); windows/s, live streams per device at `fps` and `stride`, memory per stream;
- standing questions: window cost with 0, 1, 2 and 4 standing yes/no questions (P(yes) only)
  through the pipeline's model runner, the model as the pipeline runs it on the device (compiled
  on CUDA, eager on CPU), at the largest batch, with the share of a window's cost spent before
  decoding; on the tiny model also a mid-size random one (hidden 384, 8 layers), whose cost is
  mostly prefill, as the released model's is. On CPU, process CPU time.

`--sections` picks sections (e.g. `--sections questions`).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import StoppingCriteria

from bench.common import checkpoint, device_name, parse_args
from model import SlowFastVLM, VideoQuery, generation
from model.compiled import use_compile_cache
from model.decode_attention import backends_on
from model.prompt import CAPTION_PROMPT as QUESTION
from model.random_checkpoint import write_random_checkpoint
from model.released import RELEASED_7B_CONFIG
from pipeline.config import GenerationConfig, PipelineConfig, StandingQuestion, StreamConfig
from pipeline.engine import ModelRunner
from pipeline.engine.batch_rows import batch_row_counts
from pipeline.window import FrameRef, Window

# A mid-size random model: its window cost is mostly prefill, as the released 7B's is (the
# tiny model's is mostly per-step overhead).
MID_SIZE = {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 6,
            "num_key_value_heads": 2, "cross_attn_max_layer_depth": 8}
SECTIONS = ("start-up", "parity", "decode", "preprocess", "tower", "windows", "questions")
YES_NO_QUESTIONS = ["Is anyone in the loading bay?", "Is there smoke?", "Is a door open?", "Is a truck at the gate?"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best-of-N wall seconds after one warm-up call."""
    fn()
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def compiles(args: argparse.Namespace, device: torch.device) -> bool:
    return device.type == "cuda" if args.compile is None else args.compile


def load(args: argparse.Namespace, device: torch.device) -> tuple[SlowFastVLM, str | None]:
    """The model to measure, and its checkpoint folder (None for --full-size: built in memory)."""
    if args.full_size:
        tokenizer_dir = checkpoint(None, Path(tempfile.mkdtemp()))
        vlm = SlowFastVLM.from_config(RELEASED_7B_CONFIG, device=device, dtype=torch.bfloat16,
                                      compile=compiles(args, device))
        vlm.tokenizer = SlowFastVLM.from_pretrained(tokenizer_dir, device="cpu").tokenizer  # ids only set lengths
        vlm.encode_batch_size = args.encode_batch
        return vlm, None
    path = checkpoint(args.model, Path(tempfile.mkdtemp()))
    return SlowFastVLM.from_pretrained(path, device=device, encode_batch_size=args.encode_batch,
                                       compile=compiles(args, device)), path


def random_features(vlm: SlowFastVLM, frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (frames, vlm.config.tokens_per_frame, vlm.config.hidden_size)
    return (torch.randn(shape, generator=g) * 0.02).to(vlm.device, vlm.dtype)


class StepClock(StoppingCriteria):
    """Wall time at the end of each decode step (after a device sync); median interval in ms.

    Both sides get the same treatment: our decoder's step is wrapped, transformers'
    `generate` calls it as a stopping criterion once per step (where it syncs anyway).
    """

    def __init__(self, device: torch.device):
        self.device, self.stamps = device, []

    def tick(self) -> None:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def __call__(self, input_ids=None, scores=None, **kwargs):  # transformers' StoppingCriteria protocol
        self.tick()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def median_ms(self) -> float:
        gaps = sorted(b - a for a, b in zip(self.stamps, self.stamps[1:]))
        return gaps[len(gaps) // 2] * 1e3 if gaps else float("nan")


class TimedStep:
    """A decoder's step that ticks `clock` after each call. Anything else is the step's own:
    the decoder asks a compiled step whether it is still `active`."""

    def __init__(self, step: Callable, clock: StepClock):
        self.step, self.clock = step, clock

    def __call__(self, *args):
        out = self.step(*args)
        self.clock.tick()
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.step, name)


def ours_step_ms(vlm: SlowFastVLM, decoder: generation.Decoder, queries: list[VideoQuery], new_tokens: int) -> float:
    settings = generation.SamplingSettings(max_new_tokens=new_tokens)
    decoder.generate(vlm._batch(queries, new_tokens), settings, [])  # compile / capture this shape
    clock = StepClock(vlm.device)
    attribute = "compiled_step" if decoder.compiled_step is not None else "step"
    inner = getattr(decoder, attribute)
    setattr(decoder, attribute, TimedStep(inner, clock))
    try:
        decoder.generate(vlm._batch(queries, new_tokens), settings, [])
    finally:
        setattr(decoder, attribute, inner)
    return clock.median_ms()


# ---- sections ---------------------------------------------------------------------------
def bench_parity(args: argparse.Namespace) -> dict:
    """fp32 on CUDA vs the CPU eager output of a tiny official-format checkpoint."""
    folder = checkpoint(None, Path(tempfile.mkdtemp()))
    cpu = SlowFastVLM.from_pretrained(folder, device="cpu", compile=False)
    gpu = SlowFastVLM.from_pretrained(folder, device="cuda", dtype=torch.float32)
    query = VideoQuery(features=random_features(cpu, 16), question=QUESTION)
    settings = generation.SamplingSettings(max_new_tokens=24)
    reference = cpu.next_token_logits(query)
    expected = generation.Decoder(cpu.network).generate(cpu._batch([query], 24), settings, [])[0].token_ids
    query_gpu = VideoQuery(features=query.features.cuda(), question=QUESTION)
    out = {"parity_max_logit_diff": float((gpu.next_token_logits(query_gpu) - reference).abs().max())}
    for name, decoder in (("eager", generation.Decoder(gpu.network)), ("compiled", gpu.decoder)):
        ids = decoder.generate(gpu._batch([query_gpu], 24), settings, [])[0].token_ids
        out[f"parity_greedy_ids_equal_{name}"] = f"{sum(a == b for a, b in zip(ids, expected))}/{len(expected)}"
    return out


def bench_decode(vlm: SlowFastVLM, args: argparse.Namespace) -> list[dict]:
    """Our decode step (eager, and compiled when compiling), then the step with each decode
    attention backend that runs on this device (compiled when compiling, as the worker runs it)."""
    features = random_features(vlm, args.window)
    compiled = vlm.decoder.compiled_step is not None
    mode = "reduce-overhead" if compiled and vlm.device.type == "cuda" else None
    attention_decoders = {
        backend: vlm.decoder if compiled and backend == vlm.decoder.decode_attention
        else generation.Decoder(vlm.network, compile=compiled, mode=mode, decode_attention=backend)
        for backend in backends_on(vlm.device, vlm.dtype)
    }
    rows = []
    for batch_size in args.batches:
        queries = [VideoQuery(features=features, question=QUESTION)] * batch_size
        row = {"batch": batch_size}
        decoders = {"ours_eager": generation.Decoder(vlm.network)}
        if vlm.decoder.compiled:
            decoders["ours_compiled"] = vlm.decoder
        for name, decoder in decoders.items():
            row[name] = ours_step_ms(vlm, decoder, queries, args.new_tokens)
        for backend, decoder in attention_decoders.items():
            row[f"attention_{backend}"] = ours_step_ms(vlm, decoder, queries, args.new_tokens)
            row[f"attention_{backend}_compiled"] = decoder.compiled
        row["prompt_tokens"] = vlm._batch(queries[:1], 1).valid.shape[1]
        rows.append(row)
    return rows


def bench_transformers(vlm: SlowFastVLM, args: argparse.Namespace, rows: list[dict]) -> None:
    """transformers' Qwen2ForCausalLM with the same shapes, random weights, same prompt length."""
    from transformers import Qwen2ForCausalLM

    config = vlm.config.text_config("sdpa")
    with torch.device(vlm.device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(vlm.dtype)
        try:
            reference = Qwen2ForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(previous)
    for row in rows:
        ids = torch.randint(0, config.vocab_size, (row["batch"], row["prompt_tokens"]), device=vlm.device)
        for name, extra in (("transformers_dynamic", {}), ("transformers_static", {"cache_implementation": "static"})):
            clocks = []
            for _ in range(2):  # the first call compiles (static cache on CUDA)
                clocks.append(StepClock(vlm.device))
                with torch.inference_mode():
                    reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                       do_sample=False, pad_token_id=0, eos_token_id=None,
                                       stopping_criteria=[clocks[-1]], **extra)
            row[name] = clocks[-1].median_ms()
    del reference
    gc.collect()
    if vlm.device.type == "cuda":
        torch.cuda.empty_cache()


def bench_preprocess(vlm: SlowFastVLM, args: argparse.Namespace) -> dict:
    """Ours (torch, batched) against transformers' CLIPImageProcessor on PIL images."""
    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessor

    from model.preprocess import CLIP_MEAN, CLIP_STD

    frames = np.random.default_rng(0).integers(0, 256, (args.window, 720, 1280, 3), dtype=np.uint8)
    size = vlm.config.image_size
    processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=3,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    ours = timed(lambda: vlm.preprocess(frames), vlm.device, args.repeats)
    pil = timed(lambda: processor([Image.fromarray(f) for f in frames], return_tensors="pt"), vlm.device, 1)
    return {"preprocess_fps": len(frames) / ours, "clip_processor_fps": len(frames) / pil,
            "preprocess_vs_clip_processor": pil / ours}


def bench_tower(vlm: SlowFastVLM, args: argparse.Namespace) -> dict:
    size = vlm.config.image_size
    pixels = torch.randn(args.encode_batch * 2, 3, size, size, device=vlm.device, dtype=vlm.dtype)
    out = {}
    towers = {"eager": vlm.network.model.vision_tower}
    if vlm.tower is not vlm.network.model.vision_tower:
        towers["compiled"] = vlm.tower
    for name, tower in towers.items():
        with torch.inference_mode():
            seconds = timed(lambda t=tower: vlm.network.encode_video_frames(pixels, args.encode_batch, t), vlm.device, args.repeats)
        out[f"tower_fps_{name}"] = len(pixels) / seconds
    return out


@torch.inference_mode()  # as the authors' inference runs; with autograd every activation stays alive
def authors_features(vlm: SlowFastVLM, pixels: torch.Tensor, encode_batch: int) -> torch.Tensor:
    """The authors' way of encoding a window: every frame through the eager tower."""
    return vlm.network.encode_video_frames(pixels, encode_batch)


def bench_windows(vlm: SlowFastVLM, args: argparse.Namespace) -> dict:
    """Pipeline way: each window encodes only its `stride` new frames, windows batched.
    Authors' way: each window encodes all its frames, one clip at a time, eager decode."""
    size = vlm.config.image_size
    ring = random_features(vlm, args.window)
    new_pixels = {b: torch.randn(b * args.stride, 3, size, size, device=vlm.device, dtype=vlm.dtype) for b in args.batches}
    settings = generation.SamplingSettings(max_new_tokens=args.new_tokens)
    out, best = {}, 0.0
    weights = sum(p.numel() * p.element_size() for p in vlm.network.parameters())

    def pipeline_batch(batch_size: int) -> None:
        new = vlm.encode_frames(new_pixels[batch_size]).view(batch_size, args.stride, *ring.shape[1:])
        queries = [VideoQuery(features=torch.cat([ring[args.stride :], new[i]]), question=QUESTION) for i in range(batch_size)]
        vlm.decoder.generate(vlm._batch(queries, args.new_tokens), settings, [])

    for batch_size in args.batches:
        if vlm.device.type == "cuda":  # only this batch size's cache counts towards its peak
            vlm.decoder.release_buffers()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(vlm.device)
        seconds = timed(lambda b=batch_size: pipeline_batch(b), vlm.device, args.repeats)
        out[f"window_s_B{batch_size}"] = seconds
        out[f"windows_per_s_B{batch_size}"] = batch_size / seconds
        best = max(best, batch_size / seconds)
        if vlm.device.type == "cuda":
            activations = torch.cuda.max_memory_allocated(vlm.device) - weights
            ring_bytes = ring.numel() * ring.element_size()
            out[f"gpu_mib_per_stream_B{batch_size}"] = (activations / batch_size + ring_bytes) / 2**20

    all_pixels = torch.randn(args.window, 3, size, size, device=vlm.device, dtype=vlm.dtype)
    eager = generation.Decoder(vlm.network)

    def authors_way() -> None:
        features = authors_features(vlm, all_pixels, args.encode_batch)
        eager.generate(vlm._batch([VideoQuery(features=features, question=QUESTION)], args.new_tokens), settings, [])

    authors = 1.0 / timed(authors_way, vlm.device, 1)
    out["authors_way_windows_per_s"] = authors
    out["best_windows_per_s_vs_authors"] = best / authors
    out["live_streams_per_device"] = best * args.stride / args.fps
    return out


def bench_questions(vlm: SlowFastVLM, args: argparse.Namespace, label: str) -> dict:
    """Window cost with 0, 1, 2 and 4 standing yes/no questions (trigger p_yes_above 0.5, P(yes)
    only) per stream, through the pipeline's ModelRunner: the largest batch of windows per
    call, each window encoding its `stride` new frames, as in steady state. The settings take
    turns within each round (best of `repeats` rounds). On CPU the time is the process's CPU
    time, which other jobs on a shared machine leave alone (run with OMP_NUM_THREADS=1 so
    no thread spins waiting for another); on CUDA, wall time."""
    clock = time.process_time if vlm.device.type == "cpu" else time.perf_counter
    batch = max(args.batches)
    size = vlm.config.image_size
    images = np.random.default_rng(0).integers(0, 256, (args.window + args.stride, size, size, 3), dtype=np.uint8)

    def fetch(refs: Sequence[FrameRef]) -> list[np.ndarray]:
        return [images[ref.ref % len(images)] for ref in refs]

    def next_batch(questions: int, new_tokens: int) -> Callable[[], None]:
        """A call per window step of `batch` streams with `questions` standing questions each."""
        standing = [StandingQuestion(id=f"q{i}", prompt=f"{text} Answer yes or no.", trigger={"p_yes_above": 0.5},
                                     answer="probability") for i, text in enumerate(YES_NO_QUESTIONS[:questions])]
        runner = ModelRunner(vlm, GenerationConfig(max_new_tokens=new_tokens), batch, fetch)
        streams = [f"camera-{i}" for i in range(batch)]
        for stream in streams:
            runner.add_stream(StreamConfig(id=stream, source="rtsp://bench/camera", standing_questions=standing))
        step = 0

        def one_batch() -> None:
            nonlocal step
            first = step * args.stride
            frames = tuple(FrameRef(seq, seq / args.fps, 0.0, seq) for seq in range(first, first + args.window))
            runner.run_windows([Window(stream, step, frames, live=True) for stream in streams])
            step += 1

        one_batch()  # fills the feature rings (the whole window encoded): not timed
        return one_batch

    # The caption's first token only ("first_token"): frames encoded and prompts prefilled, no decoding.
    settings = {0: (0, args.new_tokens), 1: (1, args.new_tokens), 2: (2, args.new_tokens), 4: (4, args.new_tokens),
                "first_token": (0, 1)}
    calls = {name: next_batch(*setting) for name, setting in settings.items()}
    seconds = dict.fromkeys(calls, float("inf"))
    for _ in range(args.repeats):
        for name, call in calls.items():
            start = clock()
            call()
            synchronize(vlm.device)
            seconds[name] = min(seconds[name], (clock() - start) / batch)
    counts = (0, 1, 2, 4)
    out = {f"questions_{label}_window_ms_Q{count}": seconds[count] * 1e3 for count in counts}
    out[f"questions_{label}_no_decode_share"] = seconds["first_token"] / seconds[0]
    out[f"questions_{label}_cpu_time"] = clock is time.process_time
    out |= {f"questions_{label}_Q{count}_vs_Q0": seconds[count] / seconds[0] for count in counts[1:]}
    out |= {f"questions_{label}_live_streams_Q{count}": args.stride / args.fps / seconds[count] for count in counts}
    return out


def pipeline_model(vlm: SlowFastVLM, path: str | None, args: argparse.Namespace) -> SlowFastVLM:
    """The bench's model as the pipeline runs it on this device: compiled on CUDA, eager on CPU
    (a CPU run that compiles gets an eager copy of its checkpoint)."""
    if vlm.device.type == "cuda" or vlm.decoder.compiled_step is None or path is None:
        return vlm
    return SlowFastVLM.from_pretrained(path, device=vlm.device, encode_batch_size=args.encode_batch)


def start_up_child(args: argparse.Namespace, device: torch.device, cache: Path) -> None:
    """One model worker start (load, then the warm-up a worker does for `batch_size` = the
    largest batch) with `cache` as the compile cache; prints its seconds as JSON."""
    use_compile_cache(cache)
    started = time.perf_counter()
    vlm, _ = load(args, device)
    loaded = time.perf_counter()
    config = PipelineConfig(window=args.window, stride=args.stride, batch_size=max(args.batches),
                            generation=GenerationConfig(max_new_tokens=args.new_tokens))
    warm_up = vlm.warm_up(config.window, config.generation.max_new_tokens, batch_row_counts(config),
                          config.generation.decode_cross_attention)
    print(json.dumps({"load_s": loaded - started, "warm_up_s": warm_up}))


def bench_start_up(argv: Sequence[str], cache: Path) -> dict:
    """A first start with the empty compile cache `cache`, then a second start with what the
    first left there, each in a new process (as a restarted model worker)."""
    out = {}
    for name in ("first", "second"):
        command = [sys.executable, "-m", "bench.model_bench", *argv, "--start-up-child", str(cache)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"start-up ({name} start) failed:\n{done.stderr[-3000:]}")
        child = json.loads(done.stdout.strip().splitlines()[-1])
        out[f"start_up_{name}_warm_up_s"] = child["warm_up_s"]
        out[f"start_up_{name}_s"] = child["load_s"] + child["warm_up_s"]
    out["start_up_warm_up_second_vs_first"] = out["start_up_second_warm_up_s"] / out["start_up_first_warm_up_s"]
    out["start_up_second_vs_first"] = out["start_up_second_s"] / out["start_up_first_s"]
    return out


def report(section: dict) -> None:
    for key, value in section.items():
        print(f"{key:>36}: {value:.3f}" if isinstance(value, float) else f"{key:>36}: {value}", flush=True)


def print_decode(rows: list[dict], decode_attention: str) -> None:
    columns = [c for c in ("ours_eager", "ours_compiled", "transformers_dynamic", "transformers_static") if c in rows[0]]
    print(f"decode ms/step, {rows[0]['prompt_tokens']}-token prompt (decode attention auto: {decode_attention}):")
    print(f"{'batch':>7} " + " ".join(f"{c:>21}" for c in columns))
    for row in rows:
        print(f"{row['batch']:>7} " + " ".join(f"{row[c]:>21.2f}" for c in columns))
        ours = row.get("ours_compiled", row["ours_eager"])
        for baseline in ("transformers_dynamic", "transformers_static"):
            if baseline in row and ours > 0:
                print(f"{'':>7} ours/{baseline}: {ours / row[baseline]:.2f}x the time")
        for backend in (b for b in ("sdpa", "flex", "flash") if f"attention_{b}" in row):
            ms = row[f"attention_{backend}"]
            how = "compiled" if row[f"attention_{backend}_compiled"] else "eager"
            print(f"{'':>7} decode attention {backend}: {ms:.2f} ms/step {how}, "
                  f"{ms / row['attention_sdpa']:.2f}x sdpa's time")
    sys.stdout.flush()


def print_questions(section: dict, label: str, batch: int) -> None:
    key = f"questions_{label}"
    cells = [f"none {section[f'{key}_window_ms_Q0']:.1f} ms ({section[f'{key}_no_decode_share']:.0%} before decoding)"]
    cells += [f"{n}: {section[f'{key}_window_ms_Q{n}']:.1f} ms ({section[f'{key}_Q{n}_vs_Q0']:.2f}x)" for n in (1, 2, 4)]
    print(f"standing yes/no questions per window, {label}, windows per call {batch}: " + ", ".join(cells)
          + (" (CPU time)" if section[f"{key}_cpu_time"] else ""), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.model_bench", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="tiny random model, small batches and windows (default)")
    size.add_argument("--full-size", action="store_true", help="7B architecture with random bf16 weights (GPU)")
    size.add_argument("--model", help="checkpoint folder")
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compiled decode step and tower (default: on CUDA only)")
    parser.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=None,
                        help="batch sizes (default 1,8,32 full size; 1,2 tiny)")
    parser.add_argument("--window", type=int, default=None, help="frames per window (default 64; 16 tiny)")
    parser.add_argument("--stride", type=int, default=None, help="new frames per window (default 16; 4 tiny)")
    parser.add_argument("--fps", type=float, default=4.0)
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per window (default 64; 16 tiny)")
    parser.add_argument("--encode-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=None, help="best of N (default 3; 1 tiny)")
    parser.add_argument("--skip-transformers", action="store_true", help="leave out the transformers baseline")
    parser.add_argument("--sections", type=lambda s: s.split(","), default=list(SECTIONS[1:]),
                        help=f"which of {','.join(SECTIONS)} to run (default: all but start-up, which starts the "
                        "model twice more and needs compiling; parity runs on CUDA only)")
    parser.add_argument("--start-up-child", type=Path, help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    # Smoke: one batch size, so the cold compile (the start-up's first start) is one decode graph and the tower.
    args = parse_args(parser, argv, smoke={"device": "cpu", "batches": [1], "window": 4, "stride": 2,
                                           "new_tokens": 3, "encode_batch": 2, "compile": True,
                                           "sections": list(SECTIONS)})
    if args.smoke and (args.full_size or args.model):
        parser.error("--smoke runs the tiny model: leave out --full-size and --model")
    small = not (args.full_size or args.model)
    defaults = {"batches": [1, 2] if small else [1, 8, 32], "window": 16 if small else 64, "stride": 4 if small else 16,
                "new_tokens": 16 if small else 64, "repeats": 1 if small else 3}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {','.join(unknown)}: choose from {','.join(SECTIONS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start_up = "start-up" in args.sections
    if start_up and not compiles(args, device):
        parser.error("the start-up section measures compiling: on CPU add --compile")
    torch.manual_seed(0)
    if args.start_up_child is not None:
        start_up_child(args, device, args.start_up_child)
        return
    started = time.perf_counter()
    results: dict = {"device": device_name(device), "torch": torch.__version__}
    print(f"device: {results['device']}, torch {results['torch']}", flush=True)
    if start_up:
        cache = Path(tempfile.mkdtemp(prefix="compile-cache-"))
        section = bench_start_up(argv, cache)
        use_compile_cache(cache)  # this process compiles the same shapes: it loads them
        print(f"start-up: warm-up {section['start_up_first_warm_up_s']:.1f} s first, "
              f"{section['start_up_second_warm_up_s']:.1f} s second with the compile cache "
              f"({section['start_up_warm_up_second_vs_first']:.2f}x); load + warm-up {section['start_up_first_s']:.1f} s, "
              f"{section['start_up_second_s']:.1f} s ({section['start_up_second_vs_first']:.2f}x)", flush=True)
        results |= section
    if device.type == "cuda" and "parity" in args.sections:
        section = bench_parity(args)
        report(section)
        results |= section
    vlm, path = load(args, device)
    warm_up_s = vlm.warm_up(args.window, args.new_tokens, args.batches)
    section = {"dtype": str(vlm.dtype), "compiled": vlm.decoder.compiled, "batches": args.batches,
               "window": args.window, "stride": args.stride, "new_tokens": args.new_tokens, "warm_up_s": warm_up_s}
    print(f"{section['dtype']}, compiled={section['compiled']}, warm-up {warm_up_s:.1f} s"
          + (" (with the start-up's compile cache)" if start_up else ""), flush=True)
    results |= section
    if "decode" in args.sections:
        decode_rows = bench_decode(vlm, args)
        if not args.skip_transformers:
            bench_transformers(vlm, args, decode_rows)
        print_decode(decode_rows, vlm.decoder.decode_attention)
        results["decode_ms_per_step"] = decode_rows
        results["decode_attention"] = vlm.decoder.decode_attention
    for name, bench in (("preprocess", bench_preprocess), ("tower", bench_tower), ("windows", bench_windows)):
        if name in args.sections:
            section = bench(vlm, args)
            report(section)
            results |= section
    if "questions" in args.sections:
        models = [("tiny" if small else "released_7b" if args.full_size else "model", pipeline_model(vlm, path, args))]
        if small:
            mid_size = write_random_checkpoint(Path(tempfile.mkdtemp()) / "mid-size", **MID_SIZE)
            models.append(("mid_size", SlowFastVLM.from_pretrained(mid_size, device=device,
                                                                   encode_batch_size=args.encode_batch)))
        for label, model in models:
            section = bench_questions(model, args, label)
            print_questions(section, label, max(args.batches))
            results |= section
    results["bench_s"] = time.perf_counter() - started
    print(f"bench took {results['bench_s']:.0f} s", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
