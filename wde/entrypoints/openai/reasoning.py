"""Reasoning models' thinking, split from their answer: `<think>...</think>` text goes to `reasoning_content`.

Qwen3 (and DeepSeek-R1) write their reasoning between <think> and </think> before the answer; their templates
may have written the opening <think> into the prompt already, so an answer that holds a </think> with no
<think> before it was reasoning up to there. On a stream the split is made as the text comes: a chunk that
ends with the start of a tag holds that part back until the next chunk says whether the tag is complete.
"""
START, END = "<think>", "</think>"


def _held_back(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag` (and must wait for more)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ReasoningSplitter:
    """Feed the answer's text as it grows; get (reasoning, content) deltas. One per completion."""

    def __init__(self):
        self.pending = ""  # text not yet given out: the possible start of a tag
        self.thinking: bool | None = None  # None: the answer has not said yet (no text, or only the tag's start)
        self.reasoning_so_far = ""  # reasoning given out while unsure whether it was reasoning (no <think>)
        self.after_end = False  # just past </think>: the newlines that separate it from the answer are dropped

    def feed(self, text: str) -> tuple[str, str]:
        text = self.pending + text
        self.pending = ""
        reasoning, content = "", ""
        while text:
            if self.thinking is None:
                stripped = text.lstrip()
                if stripped.startswith(START):
                    self.thinking, text = True, stripped[len(START):]
                    continue
                if START.startswith(stripped):  # maybe <think> still coming
                    self.pending = text
                    break
                self.thinking = "maybe"  # no opening tag: reasoning only if a </think> comes
            if self.thinking in (True, "maybe"):
                end = text.find(END)
                if end >= 0:
                    reasoning += text[:end]
                    self.thinking, self.after_end, text = False, True, text[end + len(END):]
                    continue
                keep = _held_back(text, END)
                reasoning += text[:len(text) - keep]
                self.pending = text[len(text) - keep:]
                break
            if self.after_end:
                text = text.lstrip("\n")
                self.after_end = not text
            content += text
            break
        if self.thinking == "maybe":  # not known to be reasoning: held as such until </think> or the end
            self.reasoning_so_far += reasoning
            return "", ""
        if self.reasoning_so_far:  # a </think> came: what was held was reasoning
            reasoning, self.reasoning_so_far = self.reasoning_so_far + reasoning, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is left at the end of the answer: text never closed by </think> without a <think> before it was
        the answer, not reasoning."""
        if self.thinking == "maybe":
            return "", self.reasoning_so_far + self.pending
        if self.thinking is True:
            return self.pending, ""
        return "", self.pending


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning_content or None, content) of a whole answer."""
    splitter = ReasoningSplitter()
    reasoning, content = splitter.feed(text)
    rest_reasoning, rest_content = splitter.finish()
    return (reasoning + rest_reasoning) or None, content + rest_content
