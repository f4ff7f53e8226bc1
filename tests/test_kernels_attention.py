"""The paged attention kernels against the float64 torch reference (on the CPU through TRITON_INTERPRET=1)."""
from dataclasses import replace

import pytest
import torch

from tests.kernel_reference import make_problem, reference_attention
from wde.core.kernels.paged_decode import DecodeTile, paged_decode, split_counters
from wde.core.kernels.paged_prefill import paged_prefill
from wde.core.kernels.store_kv import store_kv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 problems: exact in the interpreter and on a GPU (tl.dot multiplies float32 inputs exactly there)
TOLERANCE = 1e-5


def relative_error(out: torch.Tensor, reference: torch.Tensor, rows: list[int]) -> float:
    got, want = out[rows].double().cpu(), reference[rows]
    return float((got - want).norm() / want.norm())


# head_dim 96 (Phi-3) and 8 compute on padded heads of 128 and 16
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(4, 4, 64, 16), (8, 2, 128, 16), (8, 1, 64, 256),
                                                                 (7, 1, 64, 16), (4, 2, 96, 16), (4, 2, 8, 16)])
@pytest.mark.parametrize("max_splits,min_per_split", [(1, 128), (3, 128), (3, 16), (16, 32)])
def test_decode(heads, kv_heads, head_dim, block_size, max_splits, min_per_split):
    # each sequence splits by its own length: 0 and 16 tokens never, 37 and 200 as min_per_split allows; the
    # last split to finish combines them, and leaves the counters zeroed for the next launch
    p = make_problem([1, 1, 1, 1], [0, 37, 200, 16], heads, kv_heads, head_dim, block_size, torch.float32, DEVICE)
    counters = split_counters(4, kv_heads, DEVICE)
    for _ in range(2):
        out = torch.full_like(p.q, float("nan"))
        paged_decode(p.q, p.kv_cache, out, p.block_tables, p.seq_lens, p.query_start_loc, p.scale, max_splits,
                     counters, min_per_split=min_per_split, tile=DecodeTile(32))
        assert relative_error(out, reference_attention(p), list(range(4))) < TOLERANCE
        assert not counters.any()


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(4, 2, 64, 16), (8, 1, 128, 16), (4, 4, 64, 256),
                                                                 (4, 2, 96, 16), (4, 1, 8, 16)])
def test_prefill_with_cached_context(heads, kv_heads, head_dim, block_size):
    # fresh prompts, chunks after a cached prefix, and a decode row the prefill kernel must leave alone
    query_lens, context_lens = [20, 3, 45, 1, 16], [0, 50, 17, 30, 0]
    p = make_problem(query_lens, context_lens, heads, kv_heads, head_dim, block_size, torch.float32, DEVICE)
    out = torch.full_like(p.q, float("nan"))
    paged_prefill(p.q, p.kv_cache, out, p.block_tables, p.seq_lens, p.query_start_loc, p.scale, block_m=16,
                  block_n=16)
    decode_row = sum(query_lens[:3])
    rows = [r for r in range(p.q.shape[0]) if r != decode_row]
    assert relative_error(out, reference_attention(p), rows) < TOLERANCE
    assert torch.isnan(out[decode_row]).all()


@pytest.mark.parametrize("window,softcap", [(7, None), (16, None), (40, 5.0), (None, 2.0), (1, None)])
def test_sliding_windows_and_soft_capping_in_both_kernels(window, softcap):
    """Windows shorter and longer than the context and than a tile, within and across blocks; Gemma 2's cap."""
    p = make_problem([1, 20, 1, 45, 1], [37, 30, 200, 17, 3], 8, 2, 64, 16, torch.float32, DEVICE)
    out = torch.full_like(p.q, float("nan"))
    for splits in (1, 3):
        paged_decode(p.q, p.kv_cache, out, p.block_tables, p.seq_lens, p.query_start_loc, p.scale, splits,
                     min_per_split=16, tile=DecodeTile(16), window=window, softcap=softcap)
        paged_prefill(p.q, p.kv_cache, out, p.block_tables, p.seq_lens, p.query_start_loc, p.scale, block_m=16,
                      block_n=16, window=window, softcap=softcap)
        reference = reference_attention(p, window=window, softcap=softcap)
        assert relative_error(out, reference, list(range(p.q.shape[0]))) < TOLERANCE
    assert relative_error(out, reference_attention(p), list(range(p.q.shape[0]))) > 1e-2  # they change the output


def test_decode_and_prefill_together_cover_a_mixed_batch():
    p = make_problem([1, 12, 1, 5], [40, 0, 3, 20], 4, 2, 64, 16, torch.float16, DEVICE)
    out = torch.full_like(p.q, float("nan"))
    paged_decode(p.q, p.kv_cache, out, p.block_tables, p.seq_lens, p.query_start_loc, p.scale, 2, tile=DecodeTile(16))
    paged_prefill(p.q, p.kv_cache, out, p.block_tables, p.seq_lens, p.query_start_loc, p.scale, block_m=16,
                  block_n=16)
    assert relative_error(out, reference_attention(p), list(range(p.q.shape[0]))) < 2e-3


def test_store_kv_writes_slots_and_skips_padding():
    kv_cache = torch.zeros(2, 6, 4, 2, 8, device=DEVICE)
    k, v = torch.randn(3, 2, 8, device=DEVICE), torch.randn(3, 2, 8, device=DEVICE)
    slots = torch.tensor([5, -1, 17], device=DEVICE)
    store_kv(k, v, kv_cache, slots)
    flat = kv_cache.view(2, 24, 2, 8)
    assert torch.equal(flat[0, 5], k[0]) and torch.equal(flat[1, 5], v[0])
    assert torch.equal(flat[0, 17], k[2]) and torch.equal(flat[1, 17], v[2])
    written = (flat.abs().sum(dim=(2, 3)) > 0).nonzero().tolist()
    assert written == [[0, 5], [0, 17], [1, 5], [1, 17]]  # the padding row (-1) wrote nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # (the interpreter's bfloat16 is not exact)
def test_a_float8_cache_in_both_kernels(dtype):
    """kv_cache_dtype="fp8": the kernels widen the cache's float8 K/V to the queries' type before their
    products, so they compute what the reference computes from the same float8 values."""
    p = make_problem([1, 12, 1, 5], [40, 0, 3, 20], 4, 2, 64, 16, dtype, DEVICE)
    p = replace(p, kv_cache=p.kv_cache.to(torch.float8_e4m3fn))
    out = torch.full_like(p.q, float("nan"))
    paged_decode(p.q, p.kv_cache, out, p.block_tables, p.seq_lens, p.query_start_loc, p.scale, 2, tile=DecodeTile(16))
    paged_prefill(p.q, p.kv_cache, out, p.block_tables, p.seq_lens, p.query_start_loc, p.scale, block_m=16,
                  block_n=16)
    assert relative_error(out, reference_attention(p), list(range(p.q.shape[0]))) < (
        TOLERANCE if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_float8_cache_with_per_head_scales_in_both_kernels(dtype):
    """Each KV head's K and V entries are value / scale: both kernels multiply them back (K's scale into the
    scores, V's into the weighted sum), across split and unsplit decodes, as the reference does."""
    p = make_problem([1, 12, 1, 5], [200, 0, 3, 20], 4, 2, 64, 16, dtype, DEVICE)
    p = replace(p, kv_cache=p.kv_cache.to(torch.float8_e4m3fn))
    kv_scales = torch.tensor([[0.25, 3.0], [2.0, 0.5]], device=DEVICE)  # [K, V] x kv_heads
    reference = reference_attention(p, kv_scales=kv_scales.cpu())
    for splits in (1, 4):
        out = torch.full_like(p.q, float("nan"))
        paged_decode(p.q, p.kv_cache, out, p.block_tables, p.seq_lens, p.query_start_loc, p.scale, splits,
                     min_per_split=16, tile=DecodeTile(16), kv_scales=kv_scales)
        paged_prefill(p.q, p.kv_cache, out, p.block_tables, p.seq_lens, p.query_start_loc, p.scale, block_m=16,
                      block_n=16, kv_scales=kv_scales)
        assert relative_error(out, reference, list(range(p.q.shape[0]))) < (
            TOLERANCE if dtype == torch.float32 else 2e-3)
    assert relative_error(out, reference_attention(p), list(range(p.q.shape[0]))) > 0.1  # the scales matter


def test_a_cache_of_the_models_dtype_ignores_scales():
    """Scales belong to a float8 cache: a float32 one is read as it is whatever kv_scales says."""
    p = make_problem([1, 12], [40, 3], 4, 2, 64, 16, torch.float32, DEVICE)
    out = torch.full_like(p.q, float("nan"))
    kv_scales = torch.full((2, 2), 7.0, device=DEVICE)
    paged_decode(p.q, p.kv_cache, out, p.block_tables, p.seq_lens, p.query_start_loc, p.scale, 1, tile=DecodeTile(16),
                 kv_scales=kv_scales)
    paged_prefill(p.q, p.kv_cache, out, p.block_tables, p.seq_lens, p.query_start_loc, p.scale, block_m=16,
                  block_n=16, kv_scales=kv_scales)
    assert relative_error(out, reference_attention(p), list(range(p.q.shape[0]))) < TOLERANCE


def test_bf16_queries_over_a_float8_cache_in_the_decode_kernel():
    """bf16 queries beside a float8 cache go to fp16 shifted by 2^-8 (the GPU's cheaper widening): a query past
    fp16's largest value (1e5) and tiny ones (1e-4) still give the reference's attention, within bf16 output."""
    p = make_problem([1, 1, 1, 1], [40, 200, 3, 20], 4, 2, 64, 16, torch.bfloat16, DEVICE)
    p.q[0, 0, :2] = torch.tensor([1e5, -1e-4], dtype=torch.bfloat16)
    p.q[1] *= 1e-3
    p = replace(p, kv_cache=p.kv_cache.to(torch.float8_e4m3fn))
    out = torch.full_like(p.q, float("nan"))
    paged_decode(p.q, p.kv_cache, out, p.block_tables, p.seq_lens, p.query_start_loc, p.scale, 2, tile=DecodeTile(16))
    assert relative_error(out, reference_attention(p), list(range(4))) < 1e-2


def test_store_kv_into_a_float8_cache_saturates():
    """Values past float8 e4m3's largest (448) are stored as it, not as NaN; the others rounded to float8."""
    kv_cache = torch.zeros(2, 2, 4, 1, 8, dtype=torch.float8_e4m3fn, device=DEVICE)
    # 126.6 and 7.99 round up into the next power of two (Triton's interpreter once halved them)
    k = torch.tensor([[[1000.0, -1000.0, 1.1, 0.3, 126.6, -7.99, 17.0, 0.0]]], device=DEVICE)
    store_kv(k, -k, kv_cache, torch.tensor([3], device=DEVICE))
    expected = k.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    assert torch.equal(kv_cache[0, 0, 3].float(), expected[0]) and torch.equal(kv_cache[1, 0, 3].float(), -expected[0])


def test_store_kv_into_a_float8_cache_divides_by_each_heads_scale():
    """A float8 cache holds value / its head's scale (K and V scaled apart), saturating at 448 after the
    division, so a scale of 4 stores values up to 1792 unclipped."""
    kv_cache = torch.zeros(2, 2, 4, 2, 8, dtype=torch.float8_e4m3fn, device=DEVICE)
    k = torch.randn(3, 2, 8, device=DEVICE) * 600
    v = torch.randn(3, 2, 8, device=DEVICE) * 5
    kv_scales = torch.tensor([[4.0, 0.5], [0.02, 1.0]], device=DEVICE)
    store_kv(k, v, kv_cache, torch.tensor([3, -1, 6], device=DEVICE), kv_scales)
    flat = kv_cache.view(2, 8, 2, 8).float()
    as_float8 = lambda x, s: (x / s[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn).float()  # noqa: E731
    for token, slot in ((0, 3), (2, 6)):
        assert torch.equal(flat[0, slot], as_float8(k[token], kv_scales[0]))
        assert torch.equal(flat[1, slot], as_float8(v[token], kv_scales[1]))
    assert (flat[0, 3, 0] * 4).abs().max() > 448  # head 0's K past 448 kept within its scale's range