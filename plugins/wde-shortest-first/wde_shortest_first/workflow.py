from wde.tasks.chat.workflow import ChatWorkflow


class ShortestFirstChatWorkflow(ChatWorkflow):
    """The chat pipeline with one slot replaced: the scheduler admits the shortest prompt first."""

    Scheduler = "wde_shortest_first.scheduler:ShortestFirstScheduler"
