"""The sliding window's effect on a decode step (issue 20). Gemma-2-2B shape (random bf16 weights): half its
layers attend within a 4,096-token window, half to the whole context. 8 sequences decode at a 4k and at a 32k
context, once with the shape's window and once with the window opened to the whole context (every layer
global), in one process.

    python -m benchmarks.window

Reports the time per decode step; its limit, the bytes a step must read (every weight, and each layer's K/V
within its window) over the device's measured bandwidth, and the fraction reached; and the KV blocks one
sequence holds in each layer group at the end.
"""
import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.model_folder import shape
from benchmarks.results_io import write_result
from benchmarks.roofline import BYTES_PER_VALUE, measure_device, model_sizes
from wde.core.loader.dummy_model import write_dummy_model_folder

logger = logging.getLogger("benchmarks")
SHAPE = "gemma-2-2b"
CONTEXTS = (4096, 32768)
BATCH = 8
STEPS = 128


def folder_for(window: int, max_len: int) -> str:
    """The shape with this window, positions up to max_len (Gemma 2's RoPE reaches past its 8,192)."""
    config = {**shape(SHAPE), "sliding_window": window, "max_position_embeddings": max_len}
    folder = Path(tempfile.gettempdir()) / "wde-benchmark-models" / f"{SHAPE}-window{window}-len{max_len}"
    if not (folder / "tokenizer.json").exists():
        write_dummy_model_folder(folder, config)
    return str(folder)


def decode_step_seconds(engine, context: int) -> float:
    """Seconds per step of BATCH sequences decoding past `context` tokens (their prefill not timed)."""
    from wde import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=STEPS + 8, ignore_eos=True)
    for i in range(BATCH):
        engine.add_request(f"ctx{context}-{i}", [(i * 7919 + pos) % 30000 + 10 for pos in range(context)], params)
    scheduler = engine.scheduler
    while scheduler.waiting or scheduler.new_requests or any(
            seq.num_computed_tokens < seq.num_prompt_tokens for seq in scheduler.running):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(STEPS):
        engine.step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / STEPS
    return seconds


def blocks_held(engine) -> list[int]:
    """The blocks the first running sequence holds in each KV layer group."""
    seq = engine.scheduler.running[0]
    return engine.kv_cache_manager.blocks_held(seq)


def step_bytes(context: int, window: int) -> float:
    """Bytes one decode step must read: every weight, and each layer's K/V within its window."""
    sizes = model_sizes(SHAPE)
    config = shape(SHAPE)
    layer_kv = sizes.kv_bytes_per_token / sizes.num_layers
    # Gemma 2 alternates: even layers windowed, odd layers global
    read = sum(min(context, window) if layer % 2 == 0 else context for layer in range(config["num_hidden_layers"]))
    return sizes.step_params(BATCH) * BYTES_PER_VALUE + BATCH * read * layer_kv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from wde import LLMEngine
    max_len = max(CONTEXTS) + STEPS + 64
    bandwidth = measure_device().bandwidth_bytes_per_s
    rows = []
    for window in (shape(SHAPE)["sliding_window"], max_len):
        engine = LLMEngine.from_engine_args(model=folder_for(window, max_len), load_format="dummy", dtype="bfloat16",
                                            max_model_len=max_len, max_num_seqs=BATCH, disable_log_stats=True)
        decode_step_seconds(engine, 512)  # warm-up: kernels compiled for these shapes
        for context in CONTEXTS:
            seconds = decode_step_seconds(engine, context)
            held = blocks_held(engine)
            while engine.has_unfinished_requests():
                engine.step()
            limit_s = step_bytes(context, window) / bandwidth
            rows.append({"window": window if window < max_len else None, "context": context,
                         "ms_per_step": round(1000 * seconds, 3), "limit_ms_per_step": round(1000 * limit_s, 3),
                         "fraction": round(limit_s / seconds, 3), "blocks_held_per_group": held})
            logger.info("window %s, context %d: %.3f ms a step (limit %.3f ms), blocks held %s", rows[-1]["window"],
                        context, 1000 * seconds, 1000 * limit_s, held)
        del engine
        torch.cuda.empty_cache()
    detail = {"shape": SHAPE, "weights": "random bf16", "batch": BATCH, "timed_steps": STEPS,
              "contexts": list(CONTEXTS), "block_size": 16, "statistic": "mean step over the timed steps"}
    path = write_result(f"window-{SHAPE}", "cuda", {"steps": rows}, None,
                        peer_error="none: this measures wde's own step with and without the window "
                                   "(the shape's peer figure is W1-gemma-2-2b's)", workload_detail=detail)
    print(f"\n{'window':>8}{'context':>9}{'ms/step':>10}{'limit ms':>10}{'fraction':>10}  blocks held per group")
    for row in rows:
        print(f"{str(row['window']):>8}{row['context']:>9}{row['ms_per_step']:>10}{row['limit_ms_per_step']:>10}"
              f"{row['fraction']:>10}  {row['blocks_held_per_group']}")
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
