"""From the model's raw middle to what the editor shows: cut, de-duplicated and fitted to the text around it.

The model returns whatever it produced until <EOT> or a token limit. Shown as is, that often runs past the
block being written, repeats the lines that already follow the cursor, or closes a bracket the editor has
already auto-closed. The rules, applied in this order (each has golden tests in tests/test_postprocess.py):

1. single line, lines inserted, or a block: a cursor with code on both sides of it, or after a code line that
   opens nothing, gets the rest of one line; a blank line or the end of a block opener (`:`, `{`, `(`, `[`)
   gets several lines; a cursor with code after it and only indentation before it (the start of a line)
   gets whole lines inserted above that code: the middle's lines up to the one where the model writes that
   code itself, or all of them when the model ended its middle (<EOT>), else only the first; each inserted
   line ends with a line break, and the cursor's indentation is repeated so the code keeps its column;
2. indentation scope: a multi-line middle stops before the first line that dedents out of the cursor's
   block (below the cursor line's indent, or to it when the cursor line opens a block; on a blank line,
   below the column where the middle's first line of text starts, if that is further right);
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


def min_new_tokens(prefix: str, on_blank_line: int, max_new: int) -> int:
    """How many ids the model must write before it may end the middle at this cursor: `on_blank_line` where
    nothing but blanks precede the cursor on its line (the user is at a line to write, and an <EOT> there at
    once would show nothing), else 0 (after code on the line, nothing more can be the right answer); never
    more than the `max_new` ids the request may write."""
    return min(max_new, on_blank_line) if not cursor_lines(prefix, "")[0].strip() else 0


def wants_multiline(prefix: str, suffix: str) -> bool:
    """Rule 1: does this cursor want a block (several lines) rather than the rest of one line?"""
    before, after = cursor_lines(prefix, suffix)
    if after.strip():
        return False  # mid-line: complete this line only
    code = before.strip()
    return not code or code.endswith(BLOCK_OPENERS)


def inserts_lines(prefix: str, suffix: str) -> bool:
    """Rule 1: is the cursor at the start of a line of code (only indentation before it), so that a
    suggestion is whole lines inserted above that code rather than text joined to it?"""
    before, after = cursor_lines(prefix, suffix)
    return not before.strip() and bool(after.strip())


def _lines_above(middle: str, before: str, after: str, ended: bool) -> Fitted | None:
    """Rule 1, lines inserted above the code after the cursor (rule 5's trimming applied to each line)."""
    lines = middle.split("\n")
    code = after.strip()
    for i, line in enumerate(lines):
        if line.strip() == code:  # the model has reached the code that follows: its middle ends here
            lines, ended = lines[:i], True
            break
    lines = [line.rstrip() for line in (lines if ended else lines[:1])]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        return None
    return Fitted(text="\n".join(lines) + "\n" + before, replace_after=0)


def _scope_cut(middle: str, before: str) -> str:
    """Rule 2: keep the lines of a multi-line middle that stay inside the cursor's block."""
    base = _indent(before)  # on a blank line, the cursor's column
    opens = before.strip().endswith(BLOCK_OPENERS)
    lines = middle.split("\n")
    if not before.strip():  # on a blank line the block is the one the middle's first line of text is in
        first = next((k for k, line in enumerate(lines) if line.strip()), None)
        if first is not None:
            base = max(base, _indent(lines[first]) + (len(before) if first == 0 else 0))
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


def fit(prefix: str, suffix: str, middle: str, multiline: bool | None = None, ended: bool = False
        ) -> Fitted | None:
    """The suggestion to show for `middle` at a cursor between `prefix` and `suffix`, or None. `ended`: the
    model ended the middle itself (<EOT>, or a worker stop where it began writing the code after the cursor)."""
    before, after = cursor_lines(prefix, suffix)
    if multiline is None:
        multiline = wants_multiline(prefix, suffix)
    text = middle.replace("\r\n", "\n")
    if not multiline and inserts_lines(prefix, suffix):
        return _lines_above(text, before, after, ended)
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
