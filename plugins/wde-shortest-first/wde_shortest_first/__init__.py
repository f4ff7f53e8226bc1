"""Shortest prompt first: LLM(model=..., workflow="chat-shortest-first")."""
from wde import register_workflow


def register() -> None:
    register_workflow("chat-shortest-first", "wde_shortest_first.workflow:ShortestFirstChatWorkflow")
