"""The default Executor: the Worker in the engine's own process. With tensor_parallel_size > 1 the pipeline
runs MultiprocExecutor (wde/core/parallel/) in its place, one Worker per device over several processes."""
from typing import Any

from wde.core import interfaces
from wde.core.config import EngineConfig


class LocalExecutor(interfaces.Executor):
    def __init__(self, config: EngineConfig, components: dict[str, type]):
        super().__init__(config, components)
        self.worker = components["Worker"](config, components)
        self.num_kv_blocks = self.worker.determine_num_kv_blocks()
        self.kv_layer_groups = self.worker.kv_layer_groups
        self.num_host_kv_blocks = self.worker.num_host_kv_blocks()
        self.host_kv_block_bytes = self.worker.kv_block_bytes() if self.num_host_kv_blocks else 0
        self.worker.init_kv_cache(self.num_kv_blocks)

    def execute_model(self, model_input: Any) -> Any:
        return self.worker.execute_model(model_input)

    def launch(self, model_input: Any) -> interfaces.LaunchedStep:
        return self.worker.launch(model_input)

    def host_copy_wait_s(self) -> float:
        return self.worker.host_copy_wait_s()

    def shutdown(self) -> None:
        """Nothing to stop: the worker lives in this process."""
