"""The workloads of GUIDE.md, drawn exactly as the transformers peer script draws them (same seeds, same order of
random calls), so wde and the peer run the same token ids."""
import random

W1_SHAPE, W2_SHAPE, W3_SHAPE, W5_SHAPE = "qwen3-0.6b", "qwen2.5-7b", "bert-base", "qwen3-0.6b"
W7_SHAPE = "qwen3-30b-a3b"  # W2's requests on a mixture of experts


def w1(num_requests: int = 256, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """Prompts of U[100, 1024] random ids and output lengths U[100, 1024]."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(num_requests)]
    return prompts, [rng.randint(100, 1024) for _ in range(num_requests)]


def w2(num_requests: int = 1000, prompt_len: int = 512, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(0, 10000) for _ in range(prompt_len)] for _ in range(num_requests)]


def w5(prompt_len: int = 128, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(0, 10000) for _ in range(prompt_len)]


def w3(num_inputs: int = 8192, seed: int = 1) -> list[list[int]]:
    """Inputs of U[16, 512] random ids in [1000, 30000) (lengths drawn as the peer script draws them)."""
    rng = random.Random(seed)
    lengths = [rng.randint(16, 512) for _ in range(num_inputs)]
    ids = random.Random(seed + 1)
    return [[ids.randrange(1000, 30000) for _ in range(length)] for length in lengths]


def w4(num_conversations: int = 64, num_turns: int = 8, system_len: int = 2048, user_len: int = 256,
       seed: int = 0) -> tuple[list[int], list[list[list[int]]]]:
    """A system prompt every conversation starts from, and each conversation's user turns of random ids."""
    rng = random.Random(seed)
    system = [rng.randint(0, 10000) for _ in range(system_len)]
    turns = [[[rng.randint(0, 10000) for _ in range(user_len)] for _ in range(num_turns)]
             for _ in range(num_conversations)]
    return system, turns
