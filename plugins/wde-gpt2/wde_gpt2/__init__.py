"""GPT-2 for wde: wde calls register() once per process (the entry point in pyproject.toml)."""
from wde import register_model


def register() -> None:
    register_model("GPT2LMHeadModel", model="wde_gpt2.model:GPT2LMHeadModel",
                   workflow="wde.tasks.chat.workflow:ChatWorkflow")  # generates as every decoder does
