"""A step's input moved to the device in one packed copy: the walk over its tensors and the packing round trip
(here, on the host), and the copy itself on a GPU."""
import pytest
import torch

from wde.core.attention.metadata import build_attn_metadata
from wde.core.packing import layout, pack_into, views
from wde.core.pinned_copy import PinnedCopier, map_tensors
from wde.core.sampling.sampler import Penalties, SamplingMetadata
from wde.workflows.decoding.model_pre_processor import ModelInput, PromptLogprobRows


def step_input() -> ModelInput:
    meta = build_attn_metadata(slots=[5, 6, 7, 40], query_lens=[3, 1], seq_lens=[3, 9], block_tables=[[0], [2, 3]])
    generator = torch.Generator().manual_seed(3)
    sampling = SamplingMetadata(
        temperature=torch.tensor([0.0, 0.7]), all_greedy=False, all_random=False, num_logprobs=2,
        top_k=torch.tensor([5, 100]),
        penalties=Penalties(torch.tensor([0.1, 0.0]), torch.zeros(2), torch.ones(2), torch.tensor([[4, 100], [7, 8]]),
                            None),
        banned=(torch.tensor([1]), torch.tensor([2])), generators={1: generator})
    return ModelInput(torch.tensor([11, 12, 13, 0]), torch.tensor([0, 1, 2, 8]), meta, torch.tensor([2, 3]), sampling,
                      [PromptLogprobRows(0, 0, [12, 13], 1)], torch.tensor([-1, -1, -1, 0]))


def flat(obj) -> list[torch.Tensor]:
    tensors = []
    map_tensors(obj, lambda t: tensors.append(t) or t)
    return tensors


def assert_same_input(moved: ModelInput, original: ModelInput, device: str) -> None:
    pairs = list(zip(flat(moved), flat(original), strict=True))
    assert len(pairs) == 16  # every tensor of the input is found, nested dataclasses and tuples included
    for new, old in pairs:
        assert new.device.type == device and new.dtype == old.dtype and torch.equal(new.cpu(), old)
    # what is not a tensor is carried over as it is
    assert moved.attn_metadata.query_lens_host is original.attn_metadata.query_lens_host
    assert moved.sampling.generators is original.sampling.generators
    assert moved.prompt_logprobs[0].targets == [12, 13] and moved.sampling.num_logprobs == 2
    assert moved.sampling.penalties.prompt_tokens is None


def test_map_tensors_rebuilds_the_input_with_changed_tensors():
    original = step_input()
    doubled = map_tensors(original, lambda t: t * 2)
    assert torch.equal(doubled.input_ids, original.input_ids * 2)
    assert torch.equal(doubled.attn_metadata.block_tables, original.attn_metadata.block_tables * 2)
    assert torch.equal(doubled.sampling.banned[1], original.sampling.banned[1] * 2)
    assert_same_input(map_tensors(original, lambda t: t), original, "cpu")


@pytest.mark.parametrize("dtypes", [[torch.int64, torch.int32, torch.bool, torch.bfloat16, torch.float32, torch.uint8],
                                    [torch.bool, torch.int64], [torch.float16, torch.int32, torch.int64]])
def test_packed_tensors_come_back_as_views_of_one_buffer(dtypes):
    g = torch.Generator().manual_seed(len(dtypes))
    shapes = [(3,), (2, 5), (), (0,), (7, 1), (1,)]
    tensors = [(torch.rand(shape, generator=g) * 100).to(dtype) for dtype, shape in zip(dtypes, shapes)]
    offsets, size = layout(tensors)
    assert all(offset % 16 == 0 for offset in offsets)
    buffer = torch.zeros(size, dtype=torch.uint8)
    pack_into(buffer, tensors, offsets)
    unpacked = views(buffer, [(t.dtype, list(t.shape)) for t in tensors], offsets)
    for new, old in zip(unpacked, tensors, strict=True):
        assert new.dtype == old.dtype and new.shape == old.shape and torch.equal(new, old)
        assert new.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()


def test_off_cuda_the_input_stays_where_it_is():
    original = step_input()
    assert PinnedCopier(torch.device("cpu")).to_device(original) is original


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_copy_moves_every_tensor_and_the_ring_reuses_its_buffers():
    copier = PinnedCopier(torch.device("cuda"))
    for step in range(5):  # past the ring's two pinned buffers
        original = step_input()
        original.input_ids += step
        moved = copier.to_device(original)
        assert_same_input(moved, original, "cuda")
    already_there = step_input()
    already_there.input_ids = already_there.input_ids.cuda()
    assert copier.to_device(already_there).input_ids is already_there.input_ids
