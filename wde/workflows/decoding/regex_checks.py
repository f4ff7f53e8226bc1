"""What xgrammar compiles in a regex but would not hold the output to.

Seen with xgrammar 0.2.9: an anchor inside the pattern ("a^b", "a$b") is taken as matching nothing, so it lets
"ab" through, which no regex engine matches; lookaround it ignores; and in a JSON schema's `pattern`, control
characters named in the pattern ("[\\x00-\\x1f]") are written raw into the JSON string, which no JSON parser
reads. Each is refused with the request's constraint, by name.
"""
import re

LOOKAROUND = re.compile(r"\(\?<?[=!]")
# a control character in the pattern, or an escape that names one (\x00-\x1f, \u0000-\u001f, \cX, \0)
CONTROL = re.compile(r"[\x00-\x1f]|\\x[01][0-9a-fA-F]|\\u00[01][0-9a-fA-F]|\\c|\\0")
OPENERS = {None, "(", "|"}  # what may stand before a ^: the start of the pattern, a group or an alternative
CLOSERS = {None, ")", "|"}


def misplaced_anchor(pattern: str) -> str | None:
    """The first ^ or $ (unescaped, outside a character class) that is not at an end of the pattern, of a
    group or of an alternative; None if there is none."""
    before, i, in_class = None, 0, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            before, i = "\\", i + 2
            continue
        if in_class:
            in_class, i = char != "]", i + 1
            continue
        if char == "[":  # a "]" right after "[" or "[^" is a member, not the end
            i += 2 if pattern[i + 1:i + 2] == "^" else 1
            i += 1 if pattern[i:i + 1] == "]" else 0
            before, in_class = "]", True
            continue
        if char == "(" and pattern[i + 1:i + 3] == "?:":  # a group that captures nothing opens like any group
            before, i = "(", i + 3
            continue
        after = pattern[i + 1] if i + 1 < len(pattern) else None
        if (char == "^" and before not in OPENERS) or (char == "$" and after not in CLOSERS):
            return f"{char!r} at {i}"
        before, i = char, i + 1
    return None


def unenforced_regex(pattern: str, in_json_string: bool) -> str | None:
    """Why xgrammar would not hold an output to `pattern` (a regex constraint, or a JSON schema's `pattern`
    when `in_json_string`), or None."""
    if LOOKAROUND.search(pattern):
        return "lookaround ((?=, (?!, (?<=, (?<!)"
    anchor = misplaced_anchor(pattern)
    if anchor is not None:
        return f"an anchor inside the pattern ({anchor}), which matches nothing there"
    if in_json_string and CONTROL.search(pattern):
        return "control characters (\\x00-\\x1f), which a JSON string cannot hold unescaped"
    return None
