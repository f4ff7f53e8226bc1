"""Multi-turn chat over a KV cache too small for the live histories: the host tier against prefix caching on the
device only and against no prefix caching (issue 21).

    python -m benchmarks.multiturn                       # GPU: workload W4, Qwen3-0.6B shape
    python -m benchmarks.multiturn --shape qwen2.5-7b

W4: 64 conversations x 8 turns from one 2,048-token system prompt; each turn appends 256 user tokens to the
conversation's history (the earlier turns and their answers) and asks for 128 tokens (greedy, EOS ignored). A
conversation's next turn is sent as soon as its last answer is complete. The device's KV cache holds about a
quarter of the histories' tokens at their longest (the system prompt once, each conversation's own tokens), the
host tier all of them. Modes: "off" (no prefix caching), "device" (prefix caching on the device only), "host"
(with the host tier, preempted conversations swapped out to it), "host-recompute" (the tier for evicted prefixes
only: preemption_mode="recompute"), and "uncapped" (prefix caching over a cache that holds everything: every
hit on the device, the ceiling of any tier). Metrics: output tokens per second over the whole run, and per turn the time to first token's p50 /
p99. Then one hit alone: a history of 4,096 tokens (the system prompt and 8 user turns) and a new turn of 256,
its time to first token when the history is on the device, in the host tier, and recomputed (medians of 5). No peer: the
workload compares wde's KV tiers.
"""
import argparse
import gc
import logging
import statistics
import time

import torch

from benchmarks.model_folder import model_folder
from benchmarks.results_io import write_result
from benchmarks.workloads import W1_SHAPE, w4

logger = logging.getLogger("benchmarks")
OUTPUT_LEN = 128
MODES = ("off", "device", "host", "host-recompute", "uncapped")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def kv_blocks_for_everything(system: list[int], turns: list[list[list[int]]], block_size: int) -> int:
    """Blocks of the system prompt once and each conversation's own tokens at its last turn's end."""
    own = sum(len(user) + OUTPUT_LEN for conversation in turns for user in conversation)
    return -(-(len(system) + own) // block_size) + len(turns)


def run_mode(mode: str, folder: str, system: list[int], turns: list[list[list[int]]], args) -> dict:
    from wde import LLMEngine, SamplingParams
    everything = kv_blocks_for_everything(system, turns, 16)
    engine = LLMEngine.from_engine_args(
        model=folder, load_format="dummy", dtype="bfloat16", max_num_seqs=len(turns),
        num_kv_blocks=everything * 2 if mode == "uncapped" else everything // 4,
        enable_prefix_caching=mode != "off", num_kv_offload_blocks=everything * 2 if "host" in mode else None,
        preemption_mode="recompute" if mode == "host-recompute" else None, async_scheduling=True,
        disable_log_stats=True)
    params = SamplingParams(temperature=0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    histories = [list(system) for _ in turns]
    next_turn = [0] * len(turns)
    sent: dict[str, tuple[int, int, float]] = {}  # request id -> (conversation, turn, sent at)
    first_token_s: list[list[float]] = [[] for _ in turns[0]]

    def send(conversation: int) -> None:
        turn = next_turn[conversation]
        histories[conversation] += turns[conversation][turn]
        request_id = f"c{conversation}-t{turn}"
        engine.add_request(request_id, list(histories[conversation]), params)
        sent[request_id] = (conversation, turn, time.perf_counter())
        next_turn[conversation] += 1

    start = time.perf_counter()
    for conversation in range(len(turns)):
        send(conversation)
    out_tokens, seen_first = 0, set()
    while engine.has_unfinished_requests():
        for output in engine.step():
            conversation, turn, sent_at = sent[output.request_id]
            if output.request_id not in seen_first and output.outputs[0].token_ids:
                seen_first.add(output.request_id)
                first_token_s[turn].append(time.perf_counter() - sent_at)
            if output.finished:
                out_tokens += len(output.outputs[0].token_ids)
                histories[conversation] += output.outputs[0].token_ids
                if next_turn[conversation] < len(turns[conversation]):
                    send(conversation)
    seconds = time.perf_counter() - start
    stats = engine.get_stats()
    result = {"out_tok_per_s": round(out_tokens / seconds, 1), "seconds": round(seconds, 2),
              "out_tokens": out_tokens, "kv_blocks": engine.kv_cache_manager.num_blocks,
              "prefix_cache_hit_rate": round(stats.prefix_cache_hit_rate, 3),
              "num_preemptions": stats.num_preemptions, "prompt_tokens_computed": stats.num_prompt_tokens,
              "host_hit_blocks": stats.num_host_hit_blocks, "host_spilled_blocks": stats.num_host_spilled_blocks,
              "swapped_blocks": stats.num_swapped_blocks, "host_gb_loaded": round(stats.host_kv_bytes_loaded / 1e9, 2),
              "host_gb_spilled": round(stats.host_kv_bytes_spilled / 1e9, 2),
              "host_copy_wait_s": round(stats.step_times.host_copy_wait_s, 3),
              "ttft_ms_by_turn": [{"p50": round(1000 * percentile(t, 0.5), 1),
                                   "p99": round(1000 * percentile(t, 0.99), 1)} for t in first_token_s],
              "ttft_ms_p50_after_the_first_turn": round(1000 * statistics.median(
                  [s for t in first_token_s[1:] for s in t]), 1)}
    logger.info("W4 %s: %s", mode, result)
    engine.close()
    del engine
    free_device_memory()
    return result


def free_device_memory() -> None:
    """What engines no longer referenced held, freed before the next one loads (an engine holds reference cycles:
    without a collection a 7B shape's second copy does not fit)."""
    gc.collect()
    torch.cuda.empty_cache()


def hit_ttft(folder: str, system: list[int], turns: list[list[list[int]]], repeats: int = 5) -> dict:
    """Time to first token of one history's next turn, its history found on the device, loaded from the host
    tier (evicted from the device by other histories first), and recomputed (prefix caching off)."""
    from wde import LLMEngine, SamplingParams
    histories = [system + [t for turn in conversation for t in turn] for conversation in turns[:repeats + 1]]
    new_turn = turns[0][0]
    blocks = -(-len(histories[0]) // 16) * 2 + 24  # two histories fit, not three
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def ttft(engine, prompt: list[int]) -> float:
        start = time.perf_counter()
        engine.add_request(f"r{time.perf_counter_ns()}", prompt, params)
        while engine.has_unfinished_requests():
            engine.step()
        return time.perf_counter() - start

    figures = {}
    for where in ("device", "host", "recomputed"):
        engine = LLMEngine.from_engine_args(
            model=folder, load_format="dummy", dtype="bfloat16", num_kv_blocks=blocks,
            enable_prefix_caching=where != "recomputed", num_kv_offload_blocks=blocks * 8 if where == "host" else None,
            disable_log_stats=True)
        ttft(engine, histories[-1][:600])  # warm
        times = []
        for history in histories[:repeats]:
            ttft(engine, history)
            if where == "host":  # two other histories push this one out of the device's cache
                ttft(engine, histories[-1])
                ttft(engine, [t + 1 for t in history])
            times.append(ttft(engine, history + new_turn))
        figures[f"{where}_ms"] = round(1000 * statistics.median(times), 2)
        if where == "host":  # each measured turn found its whole history there
            figures["host_hit_blocks"] = engine.get_stats().num_host_hit_blocks
        engine.close()
        del engine
        free_device_memory()
    figures["host_over_device"] = round(figures["host_ms"] / figures["device_ms"], 2)
    logger.info("W4 one hit: %s", figures)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default=W1_SHAPE)
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    system, turns = w4(args.conversations, args.turns)
    folder = model_folder(args.shape)
    wde = {mode: run_mode(mode, folder, system, turns, args) for mode in args.modes}
    if "host" in wde and "device" in wde:
        wde["host_over_device_throughput"] = round(wde["host"]["out_tok_per_s"] / wde["device"]["out_tok_per_s"], 2)
    wde["one_hit_ttft"] = hit_ttft(folder, system, turns)
    detail = {"shape": args.shape, "weights": "random bf16", "conversations": args.conversations,
              "turns": args.turns, "system_len": len(system), "user_len": len(turns[0][0]),
              "output_len": OUTPUT_LEN, "sampling": "greedy", "async_scheduling": True}
    workload = "W4" if args.shape == W1_SHAPE else f"W4-{args.shape}"
    path = write_result(workload, "cuda", wde, None, "not run: W4 compares wde's KV tiers", workload_detail=detail)
    for mode in args.modes:
        r = wde[mode]
        print(f"{mode:9s} {r['out_tok_per_s']:9.1f} out tok/s  TTFT p50 after turn 1 "
              f"{r['ttft_ms_p50_after_the_first_turn']} ms  hit rate {r['prefix_cache_hit_rate']}  "
              f"preemptions {r['num_preemptions']}")
    print("one hit's time to first token:", wde["one_hit_ttft"])
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
