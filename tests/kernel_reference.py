"""Random paged-attention problems and the plain torch answer to them, for the kernel tests (CPU and GPU)."""
import random
from dataclasses import dataclass

import torch


@dataclass
class PagedProblem:
    q: torch.Tensor  # [tokens, heads, head_dim]
    kv_cache: torch.Tensor  # [2, blocks, block_size, kv_heads, head_dim]
    block_tables: torch.Tensor  # [seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [seqs] int32
    query_start_loc: torch.Tensor  # [seqs + 1] int32
    query_lens: list[int]
    scale: float


def make_problem(query_lens: list[int], context_lens: list[int], heads: int, kv_heads: int, head_dim: int,
                 block_size: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> PagedProblem:
    """Sequence i has context_lens[i] cached tokens before its query_lens[i] new ones (all already stored)."""
    generator = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    order = list(range(num_blocks))
    random.Random(seed).shuffle(order)  # sequences own scattered blocks
    tables, taken = [], 0
    for count in blocks_per_seq:
        tables.append(order[taken:taken + count])
        taken += count
    width = max(blocks_per_seq)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    kv_cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=generator).to(dtype)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=generator).to(dtype)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    to = lambda t: t.to(device)  # noqa: E731
    return PagedProblem(to(q), to(kv_cache), to(block_tables), to(torch.tensor(seq_lens, dtype=torch.int32)),
                        to(torch.tensor(starts, dtype=torch.int32)), query_lens, head_dim ** -0.5)


def reference_attention(p: PagedProblem, dtype: torch.dtype = torch.float64, device: str = "cpu",
                        window: int | None = None, softcap: float | None = None,
                        kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole context (or the last `window` positions up
    to each token's own; scores capped to softcap * tanh(score / softcap) when given), in float64 on the CPU (or
    in float32 on the GPU for contexts too long for that); a float8 cache's entries times kv_scales [2, kv_heads]
    when given."""
    out = torch.zeros(p.q.shape, dtype=dtype, device=device)
    kv_heads = p.kv_cache.shape[3]
    group = p.q.shape[1] // kv_heads
    block_size = p.kv_cache.shape[2]
    for i, query_len in enumerate(p.query_lens):
        seq_len, start = int(p.seq_lens[i]), int(p.query_start_loc[i])
        blocks = p.block_tables[i, :-(-seq_len // block_size)].long().to(device)
        cache = p.kv_cache.to(device)
        scales = torch.ones(2, kv_heads) if kv_scales is None else kv_scales
        scales = scales.to(device, dtype)[:, None, :, None]  # [2, 1 (token), kv_heads, 1 (dim)]
        k = (cache[0][blocks].flatten(0, 1)[:seq_len].to(dtype) * scales[0]).repeat_interleave(group, dim=1)
        v = (cache[1][blocks].flatten(0, 1)[:seq_len].to(dtype) * scales[1]).repeat_interleave(group, dim=1)
        q = p.q[start:start + query_len].to(device, dtype)
        scores = torch.einsum("qhd,khd->hqk", q, k) * p.scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        query_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
        key_pos = torch.arange(seq_len, device=device)[None, :]
        hidden = (key_pos > query_pos) | ((key_pos <= query_pos - window) if window is not None else False)
        scores = scores.masked_fill(hidden, float("-inf"))
        out[start:start + query_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out
