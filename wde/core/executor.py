"""The Executor that runs the Worker in the engine's own process (one device)."""
from typing import Any

from wde.core import interfaces
from wde.core.config import EngineConfig


class LocalExecutor(interfaces.Executor):
    @classmethod
    def from_engine(cls, engine) -> "LocalExecutor":
        return cls(engine.config, engine.components)

    def __init__(self, config: EngineConfig, components: dict[str, type]):
        super().__init__(config)
        if config.args.tensor_parallel_size != 1:
            raise NotImplementedError("tensor_parallel_size > 1 is not available yet in this version of wde")
        self.worker = components["Worker"](config, components)
        self.num_kv_blocks = self.worker.determine_num_kv_blocks()
        self.worker.init_kv_cache(self.num_kv_blocks)

    def execute_model(self, model_input: Any) -> Any:
        return self.worker.execute_model(model_input)
