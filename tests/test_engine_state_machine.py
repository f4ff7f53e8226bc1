"""Random add / abort / step sequences on a tiny model, with the engine's invariants checked after every step."""
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from tests.conftest import assert_all_blocks_free
from tests.tiny_models import VOCAB_SIZE
from wde import LLMEngine, RequestOutputKind, SamplingParams
from wde.workflows.decoding.sequence import SequenceGroup, SequenceStatus

SHARED_PREFIX = list(range(100, 140))  # 40 tokens: 2 full blocks of 16 that prefix caching can share
token = st.integers(2, VOCAB_SIZE - 1)


class EngineMachine(RuleBasedStateMachine):
    folder: str = ""  # set by the test

    @initialize(prefix_caching=st.booleans(), num_blocks=st.integers(6, 24), max_num_seqs=st.integers(1, 6),
                budget=st.sampled_from([8, 24, 64]), async_scheduling=st.booleans(),
                host_blocks=st.sampled_from([None, 2, 8, 64]), preemption_mode=st.sampled_from([None, "recompute"]))
    def start(self, prefix_caching, num_blocks, max_num_seqs, budget, async_scheduling, host_blocks,
              preemption_mode):
        # a host tier swaps preempted sequences out (by default), and with prefix caching holds evicted prefixes
        # too; without prefix caching a tier that recomputes preemptions has no use, and is refused
        if not prefix_caching and preemption_mode == "recompute":
            host_blocks = None
        self.engine = LLMEngine.from_engine_args(
            model=self.folder, num_kv_blocks=num_blocks, block_size=16, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget, enable_prefix_caching=prefix_caching, max_model_len=256,
            async_scheduling=async_scheduling, num_kv_offload_blocks=host_blocks, preemption_mode=preemption_mode)
        self.submitted, self.aborted, self.finished = set(), set(), {}
        self.counter = 0

    @rule(prompt=st.lists(token, min_size=1, max_size=50), shared=st.booleans(), max_tokens=st.integers(1, 12),
          n=st.integers(1, 3), seeded=st.booleans())
    def add(self, prompt, shared, max_tokens, n, seeded):
        request_id = f"r{self.counter}"
        self.counter += 1
        params = SamplingParams(n=n, temperature=0.8 if seeded else 0, seed=self.counter if seeded else None,
                                max_tokens=max_tokens, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        self.engine.add_request(request_id, (SHARED_PREFIX if shared else []) + prompt, params)
        self.submitted.add(request_id)

    @precondition(lambda self: self.pending())
    @rule(data=st.data())
    def abort(self, data):
        request_id = data.draw(st.sampled_from(sorted(self.pending())))
        assert self.engine.abort_request(request_id)
        self.aborted.add(request_id)

    @rule()
    def step(self):
        for output in self.engine.step():
            assert output.request_id in self.submitted and output.request_id not in self.aborted
            if output.finished:
                assert output.request_id not in self.finished, "finished twice"
                self.finished[output.request_id] = output

    def pending(self) -> set[str]:
        return self.submitted - self.aborted - set(self.finished)

    @invariant()
    def blocks_are_either_free_or_used_by_their_exact_users(self):
        allocator = self.engine.kv_cache_manager.allocator
        users = [0] * allocator.num_blocks
        for seq in self.engine.scheduler.running:
            assert seq.status is SequenceStatus.RUNNING
            for block in seq.block_table:
                users[block] += 1
        for seq in self.engine.scheduler.waiting:
            assert not seq.block_table  # waiting sequences hold no blocks
        free = allocator.free_blocks()
        used = {block for block, count in enumerate(users) if count}
        assert not free & used, "a block is both free and used"
        assert len(free) + len(used) == allocator.num_blocks, "a block is neither free nor used"
        assert users == allocator.ref_counts, "reference counts differ from the number of users"

    @invariant()
    def host_blocks_are_either_free_or_held_once(self):
        tier = self.engine.kv_cache_manager.host_tier
        if tier is None:
            return
        held = list(tier.held_blocks().values())
        assert len(set(held)) == len(held), "a host block holds two keys"
        assert not set(held) & tier.free_blocks(), "a host block is both free and held"
        assert len(held) + len(tier.free_blocks()) == tier.num_blocks, "a host block is neither free nor held"

    @invariant()
    def no_request_is_lost(self):
        scheduler = self.engine.scheduler
        assert set(scheduler.requests) == self.pending()
        for request_id, entry in scheduler.requests.items():
            if isinstance(entry, SequenceGroup):
                for seq in entry.sequences:
                    queued = seq in scheduler.waiting or seq in scheduler.running
                    assert queued != seq.is_finished

    def teardown(self):
        if not hasattr(self, "engine"):
            return
        for _ in range(2000):
            if not self.engine.has_unfinished_requests():
                break
            self.step()
        assert set(self.finished) == self.submitted - self.aborted
        assert all(o.outputs[0].finish_reason in ("length", "error") for o in self.finished.values())
        assert_all_blocks_free(self.engine)


def test_engine_state_machine(tiny_model_dir):
    EngineMachine.folder = tiny_model_dir("qwen2")
    run_state_machine_as_test(EngineMachine, settings=settings(
        max_examples=40, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]))
