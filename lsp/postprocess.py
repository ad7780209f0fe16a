"""From the model's raw middle to what the editor shows: cut, de-duplicated and fitted to the text around it.

The model returns whatever it produced until <EOT> or a token limit. Shown as is, that often runs past the
block being written, repeats the lines that already follow the cursor, or closes a bracket the editor has
already auto-closed. The rules, applied in this order (each has golden tests in tests/test_postprocess.py):

1. single line or multi-line: a cursor with code after it on the same line, or after a code line that
   opens nothing, gets one line; a blank line or the end of a block opener (`:`, `{`, `(`, `[`) gets several;
2. indentation scope: a multi-line middle stops before the first line that dedents out of the cursor's
   block (below the cursor line's indent, or to it when the cursor line opens a block);
3. duplicates: the middle stops where it starts repeating the lines that follow the cursor, and a middle
   that only repeats the rest of the cursor line is dropped;
4. brackets: closing brackets and quotes at the end of the middle that are already in the text after the
   cursor replace them (the item's range runs over that auto-closed tail) instead of doubling them;
5. whitespace: trailing whitespace is trimmed from every line and from the end;
6. an empty or whitespace-only result is no suggestion at all (None).
"""

from __future__ import annotations

from dataclasses import dataclass

OPENERS = {"(": ")", "[": "]", "{": "}"}
CLOSERS = {v: k for k, v in OPENERS.items()}
QUOTES = "\"'`"
BLOCK_OPENERS = (":", "{", "(", "[")


@dataclass(frozen=True)
class Fitted:
    text: str  # inserted at the cursor
    replace_after: int  # characters after the cursor that the insertion replaces (an auto-closed tail)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def cursor_lines(prefix: str, suffix: str) -> tuple[str, str]:
    """(text of the cursor line before the cursor, text after the cursor up to the end of its line)."""
    before = prefix[prefix.rfind("\n") + 1:]
    after = suffix.split("\n", 1)[0].rstrip("\r")
    return before, after


def wants_multiline(prefix: str, suffix: str) -> bool:
    """Rule 1: does this cursor want a block (several lines) rather than the rest of one line?"""
    before, after = cursor_lines(prefix, suffix)
    if after.strip():
        return False  # mid-line: complete this line only
    code = before.strip()
    return not code or code.endswith(BLOCK_OPENERS)


def _scope_cut(middle: str, before: str) -> str:
    """Rule 2: keep the lines of a multi-line middle that stay inside the cursor's block."""
    base = _indent(before)  # on a blank line, the cursor's column
    opens = before.strip().endswith(BLOCK_OPENERS)
    lines = middle.split("\n")
    kept = [lines[0]]
    for line in lines[1:]:
        if line.strip():
            ind = _indent(line)
            if ind < base or (opens and ind <= base):
                break
        kept.append(line)
    return "\n".join(kept)


def _drop_suffix_repeats(middle: str, suffix: str) -> str:
    """Rule 3: cut the middle where its remaining lines repeat the lines after the cursor line."""
    following = [l.strip() for l in suffix.split("\n")[1:] if l.strip()]
    if not following:
        return middle
    lines = middle.split("\n")
    for i in range(1, len(lines)):
        rest = [l.strip() for l in lines[i:] if l.strip()]
        if rest and rest == following[: len(rest)]:
            return "\n".join(lines[:i])
    return middle


def _closing_tail(middle: str, after: str) -> int:
    """Rule 4: how many characters at the start of `after` the end of `middle` already supplies.

    Only brackets that the middle closes without opening them, and quotes, count: "x)" before ")" replaces
    it, but "f(x)" before ")" does not (its ")" closes its own "(")."""
    unmatched: list[str] = []  # closers in the middle with no opener in the middle
    stack: list[str] = []
    for ch in middle:
        if ch in OPENERS:
            stack.append(ch)
        elif ch in CLOSERS:
            if stack and stack[-1] == CLOSERS[ch]:
                stack.pop()
            else:
                unmatched.append(ch)
    best = 0
    for k in range(1, len(after) + 1):
        tail = after[:k]
        if not all(c in CLOSERS or c in QUOTES for c in tail):
            break
        closers = [c for c in tail if c in CLOSERS]
        if middle.endswith(tail) and closers == unmatched[len(unmatched) - len(closers):]:
            best = k
    return best


def fit(prefix: str, suffix: str, middle: str, multiline: bool | None = None) -> Fitted | None:
    """The suggestion to show for `middle` at a cursor between `prefix` and `suffix`, or None."""
    before, after = cursor_lines(prefix, suffix)
    if multiline is None:
        multiline = wants_multiline(prefix, suffix)
    text = middle.replace("\r\n", "\n")
    if not multiline:
        # A middle that starts with a newline at a mid-line cursor has nothing for this line.
        text = text.split("\n", 1)[0]
    else:
        text = _scope_cut(text, before)
        text = _drop_suffix_repeats(text, suffix)
    text = "\n".join(line.rstrip() for line in text.split("\n")).rstrip()
    if not text.strip():
        return None
    if after.strip() and text.strip() == after.strip():
        return None  # only repeats what already follows the cursor
    replace = _closing_tail(text, after)
    return Fitted(text=text, replace_after=replace)
