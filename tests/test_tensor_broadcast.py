"""The tensor-parallel step input's encoding: whatever rank 0 packs, the other ranks rebuild exactly."""
import pickle
from dataclasses import dataclass, field

import torch

from wde.core.parallel.tensor_broadcast import _flatten, _pack, _rebuild, _unpack


@dataclass
class Inner:
    lengths: list[int]
    table: torch.Tensor
    flag: bool = False


@dataclass
class Outer:
    ids: torch.Tensor
    inner: Inner
    scalars: tuple
    extra: list = field(default_factory=list)
    nothing: None = None


def round_trip(obj, send_skeleton: bool = True, skeleton=None):
    tensors = []
    skeleton_bytes = pickle.dumps(_flatten(obj, tensors))
    (header_len, payload_size, skeleton_size), buffer = _pack(tensors, skeleton_bytes if send_skeleton else b"")
    assert len(buffer) == header_len * 8 + payload_size + skeleton_size
    received, received_skeleton = _unpack(buffer.clone(), header_len, payload_size)
    skeleton = pickle.loads(received_skeleton) if received_skeleton else skeleton
    return _rebuild(skeleton, list(reversed(received))), skeleton


def assert_equal(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal(x, y)
    elif isinstance(a, (Inner, Outer)):
        for name in a.__dataclass_fields__:
            assert_equal(getattr(a, name), getattr(b, name))
    else:
        assert a == b


def sample_input(seed: int) -> Outer:
    g = torch.Generator().manual_seed(seed)
    return Outer(
        ids=torch.randint(0, 1000, (7,), generator=g),
        inner=Inner(lengths=[3, 1, 4, 1, 5], table=torch.randint(0, 9, (3, 5), generator=g, dtype=torch.int32),
                    flag=seed % 2 == 0),
        scalars=(torch.tensor(2.5), torch.rand(3, generator=g).to(torch.bfloat16), torch.tensor([True, False, True]),
                 torch.rand(2, 2, generator=g, dtype=torch.float16), torch.zeros(0, 4, dtype=torch.int64)),
        extra=[torch.arange(5, dtype=torch.uint8), "text", 7, [1.5, 2.5]])


def test_every_dtype_shape_and_value_comes_back_exactly():
    obj = sample_input(0)
    rebuilt, _ = round_trip(obj)
    assert_equal(rebuilt, obj)


def test_a_step_with_the_same_structure_reuses_the_last_skeleton():
    _, skeleton = round_trip(sample_input(0))
    following = sample_input(2)  # same structure, other values
    rebuilt, _ = round_trip(following, send_skeleton=False, skeleton=skeleton)
    assert_equal(rebuilt, following)


def test_an_input_without_tensors_or_ints():
    rebuilt, _ = round_trip(["a", None, 1.5])
    assert rebuilt == ["a", None, 1.5]
