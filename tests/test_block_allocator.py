import pytest

from wde.core.kv_cache.block_allocator import BlockAllocator


def test_blocks_are_free_again_after_the_last_reference():
    allocator = BlockAllocator(3)
    a, b = allocator.allocate(), allocator.allocate()
    assert allocator.num_free == 1 and a != b
    allocator.incref(a)
    allocator.decref(a)
    assert allocator.num_free == 1 and allocator.ref_counts[a] == 1
    allocator.decref(a)
    allocator.decref(b)
    assert allocator.num_free == 3


def test_double_free_and_exhaustion_are_errors():
    allocator = BlockAllocator(1)
    block = allocator.allocate()
    with pytest.raises(RuntimeError, match="no free"):
        allocator.allocate()
    allocator.decref(block)
    with pytest.raises(RuntimeError, match="freed more often"):
        allocator.decref(block)
