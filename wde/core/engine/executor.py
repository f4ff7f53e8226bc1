"""The default Executor: the Worker in the engine's own process, or, with tensor_parallel_size > 1, one Worker
per device over several processes (multiproc_executor.py)."""
from typing import Any

from wde.core import interfaces
from wde.core.config import EngineConfig


class LocalExecutor(interfaces.Executor):
    @classmethod
    def from_engine(cls, engine) -> interfaces.Executor:
        if engine.config.args.tensor_parallel_size > 1:
            from wde.core.parallel.multiproc_executor import MultiprocExecutor
            return MultiprocExecutor(engine.config, engine.components, engine.workflow)
        return cls(engine.config, engine.components)

    def __init__(self, config: EngineConfig, components: dict[str, type]):
        super().__init__(config)
        self.worker = components["Worker"](config, components)
        self.num_kv_blocks = self.worker.determine_num_kv_blocks()
        self.worker.init_kv_cache(self.num_kv_blocks)

    def execute_model(self, model_input: Any) -> Any:
        return self.worker.execute_model(model_input)

    def launch(self, model_input: Any) -> Any:
        return self.worker.launch(model_input)

    def shutdown(self) -> None:
        """Nothing to stop: the worker lives in this process."""
