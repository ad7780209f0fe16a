"""Building the FIM prompt for a cursor, by tokens: an exact budget, cut at line boundaries.

The budget (`max_prompt_tokens`, the ids sent to the worker) is shared in this order of importance:

1. the text before the cursor, nearest lines first: it says most about what comes next;
2. the text after the cursor, at most `suffix_share` of the room, first lines first;
3. context from other files (`Chunk`s: other open documents, recently edited regions), at most
   `context_share` of the room, or more when the file is short and leaves room unused.

Whole lines are kept or dropped; only a cursor line that alone exceeds its room is cut inside the line.
Counting is exact: the final ids are measured, and if tokens merged differently at a cut, one more line
goes, so `len(prompt.ids) <= max_prompt_tokens` always holds.

Layout, with the context and a `# Path:` header written as comments of the document's language, before
the prefix (Code Llama saw code, so context looks like code):

    SPM: [BOS, <PRE>, <SUF>] + encode_infilling(suffix) + [<MID>] + encode(context + header + prefix)
    PSM: [BOS, <PRE>] + encode(context + header + prefix) + [<SUF>] + encode_infilling(suffix) + [<MID>]

A family trained with repository-level context (Qwen2.5-Coder: `model/fim.py` `repository_prompt_tokens`)
gets the chunks and the path in its own layout instead of comments, PSM (the only order it was trained on):

    [<|repo_name|>] + encode(REPO_NAME + "\n") + ([<|file_sep|>] + encode(path + "\n" + text + "\n")) per chunk
        + [<|file_sep|>] + encode(path + "\n")
        + [<|fim_prefix|>] + encode(prefix) + [<|fim_suffix|>] + encode(suffix) + [<|fim_middle|>]

and without chunks or a path (or with `path_header` off), the plain FIM prompt; chunks without a path get the
path "untitled". `Prompt.context` is then that header written as text.

SPM is the default, for two reasons. Typing appends to the *end* of an SPM prompt (the prefix comes last),
so consecutive keystrokes share almost every token: the workers' prefix cache reuses the KV cache and can
extend a running decode. In PSM the prefix sits before the suffix, so each keystroke changes the middle of
the prompt. And Code Llama 7B scores higher in SPM on single-line infilling (83.3% vs 74.1% PSM, in the
Code Llama paper). The context goes first and in the caller's order, which must be stable across keystrokes for
the same reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from codefill.errors import CodefillError
from codefill.model.fim import infilling_prompt_tokens, repository_prompt_tokens
from codefill.model.tokenizer import Tokenizer


class PromptError(CodefillError, ValueError):
    """A prompt configuration or request that cannot be built; the message names the values."""


@dataclass(frozen=True)
class PromptConfig:
    max_prompt_tokens: int = 1536
    suffix_share: float = 0.25  # the suffix may take at most this share of the room
    context_share: float = 0.35  # other files' chunks may take at most this share, unless room is left over
    spm: bool = True
    path_header: bool = True  # a "# Path: a/b.py" line before the prefix

    def __post_init__(self) -> None:
        if not isinstance(self.max_prompt_tokens, int) or self.max_prompt_tokens < 8:
            raise PromptError(f"max_prompt_tokens must be an integer >= 8, got {self.max_prompt_tokens!r}")
        for name in ("suffix_share", "context_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise PromptError(f"{name} must be in [0, 1], got {value!r}")


@dataclass(frozen=True)
class Chunk:
    """A piece of another file offered as context."""

    path: str
    text: str


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    prefix: str  # the part of the document's prefix that was kept (ends at the cursor)
    suffix: str  # the part of the document's suffix that was kept (starts at the cursor)
    context: str  # the text placed before `prefix`: chunks and the path header
    n_chunks: int  # how many chunks fit


# Line-comment syntax by LSP language id; languages not listed get "#" only when nothing better is known.
_COMMENT = {
    **dict.fromkeys(["python", "shellscript", "ruby", "perl", "r", "yaml", "toml", "dockerfile", "makefile",
                     "elixir", "julia", "nim", "powershell", "cmake"], "#"),
    **dict.fromkeys(["c", "cpp", "csharp", "java", "javascript", "javascriptreact", "typescript",
                     "typescriptreact", "go", "rust", "kotlin", "scala", "swift", "dart", "php", "zig",
                     "objective-c", "groovy", "jsonc"], "//"),
    **dict.fromkeys(["lua", "sql", "haskell", "elm"], "--"),
    **dict.fromkeys(["lisp", "clojure", "scheme"], ";;"),
    "vim": '"',
    "erlang": "%",
    "latex": "%",
    "matlab": "%",
}


# The repository name of a repository-level prompt: the language server does not know the project's name, and
# the model only needs to see that the files belong together.
REPO_NAME = "workspace"
UNTITLED = "untitled"  # the current file's path in a repository-level prompt when the client gives none


def comment_prefix(language_id: str | None) -> str | None:
    """The line-comment marker of an LSP language id, or None when unknown (then no header is written)."""
    return _COMMENT.get((language_id or "").lower())


def _header(path: str, comment: str) -> str:
    return f"{comment} Path: {path}\n"


def _chunk_text(chunk: Chunk, comment: str) -> str:
    text = chunk.text if chunk.text.endswith("\n") else chunk.text + "\n"
    return _header(chunk.path, comment) + text


def _lines(text: str) -> list[str]:
    """Lines with their line endings kept, so "".join(_lines(t)) == t."""
    return text.splitlines(keepends=True)


def _longest_fit(n: int, fits: Callable[[int], bool]) -> int:
    """The largest k in [0, n] with fits(k), for fits monotone (true up to some k, then false)."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _cut_inside(text: str, room: int, count: Callable[[str], int], keep_end: bool) -> str:
    """The longest end (keep_end) or start of one line that fits `room` tokens, by characters."""
    def piece(k: int) -> str:
        return text[len(text) - k:] if keep_end else text[:k]

    return piece(_longest_fit(len(text), lambda k: count(piece(k)) <= room))


def build_prompt(tok: Tokenizer, prefix: str, suffix: str, config: PromptConfig = PromptConfig(), *,
                 path: str | None = None, language_id: str | None = None,
                 chunks: Sequence[Chunk] = ()) -> Prompt:
    """The FIM prompt for a cursor between `prefix` and `suffix` (see the module docstring)."""
    comment = comment_prefix(language_id)
    family = tok.family
    repo = family.file_sep is not None  # other files as the family's own file sections
    if repo:
        header = f"{path}\n" if (config.path_header and path) else ""  # the current file's line, after a <|file_sep|>
        chunk_texts = [f"{c.path}\n{c.text}\n" for c in chunks]  # each after a <|file_sep|>
        repo_line = len(tok.encode(f"{REPO_NAME}\n")) + 1
    else:
        header = _header(path, comment) if (config.path_header and path and comment) else ""
        chunk_texts = [_chunk_text(c, comment or "#") for c in chunks]

    def assemble(k: int, head: str, pre: str, suf: str) -> list[int]:
        """The prompt with the first k chunks and the header `head` ("": none)."""
        if not repo:
            return infilling_prompt_tokens(tok, "".join(chunk_texts[:k]) + head + pre, suf, spm=config.spm)
        if not k and not head:
            return infilling_prompt_tokens(tok, pre, suf)
        return repository_prompt_tokens(tok, REPO_NAME, [(c.path, c.text) for c in chunks[:k]],
                                        head[:-1] if head else UNTITLED, pre, suf)

    def context_text(k: int, head: str) -> str:
        if not repo:
            return "".join(chunk_texts[:k]) + head
        if not k and not head:
            return ""
        sections = "".join(family.file_sep + t for t in chunk_texts[:k])
        return f"{family.repo_name}{REPO_NAME}\n{sections}{family.file_sep}{head or UNTITLED + chr(10)}"

    def head_and_prefix_tokens(head: str, pre: str) -> int:
        if not repo:
            return len(tok.encode(head + pre))
        return (repo_line + 1 + len(tok.encode(head)) if head else 0) + len(tok.encode(pre))

    n_markers = len(assemble(0, "", "", ""))
    room = config.max_prompt_tokens - n_markers
    if room < 1:
        raise PromptError(f"max_prompt_tokens {config.max_prompt_tokens} leaves no room after {n_markers} markers")

    # 2. The suffix: first whole lines within its share; the rest of the cursor line is cut if it alone is too long.
    suffix_lines = _lines(suffix)
    suffix_room = int(room * config.suffix_share)
    n_suf = _longest_fit(len(suffix_lines),
                         lambda k: len(tok.encode_infilling("".join(suffix_lines[:k]))) <= suffix_room)
    kept_suffix = "".join(suffix_lines[:n_suf])
    if n_suf == 0 and suffix_lines and suffix_room > 0:
        kept_suffix = _cut_inside(suffix_lines[0], suffix_room, lambda s: len(tok.encode_infilling(s)), keep_end=False)
    suffix_tokens = len(tok.encode_infilling(kept_suffix))

    # 1. The prefix: the last whole lines that fit with the header; the cursor line is always its last line.
    prefix_lines = _lines(prefix)

    def context_tokens(k: int) -> int:
        if not k:
            return 0
        if repo:
            return sum(1 + len(tok.encode(t)) for t in chunk_texts[:k])
        return len(tok.encode("".join(chunk_texts[:k])))

    # Held back from the prefix: only what the chunks that fit in the context share need, so a chunk too
    # big for the share does not leave its room unused.
    share = int(room * config.context_share)
    reserve = context_tokens(_longest_fit(len(chunk_texts), lambda k: context_tokens(k) <= share))
    prefix_room = room - suffix_tokens - reserve
    def prefix_fits(k: int) -> bool:
        return head_and_prefix_tokens(header, "".join(prefix_lines[len(prefix_lines) - k:])) <= prefix_room

    n_pre = _longest_fit(len(prefix_lines), prefix_fits)
    kept_prefix = "".join(prefix_lines[len(prefix_lines) - n_pre:])
    if n_pre == 0 and prefix_lines and not prefix_lines[-1].endswith(("\n", "\r")):  # the cursor line itself
        line_room = prefix_room - head_and_prefix_tokens(header, "")
        if line_room <= 0:
            header, line_room = "", prefix_room
        kept_prefix = _cut_inside(prefix_lines[-1], line_room, lambda s: len(tok.encode(s)), keep_end=True)

    # 3. Context: whole chunks in the caller's order, as many as fit in what is left.
    context_room = room - suffix_tokens - head_and_prefix_tokens(header, kept_prefix)
    n_chunks = _longest_fit(len(chunk_texts), lambda k: context_tokens(k) <= context_room)

    # Exact check: tokens can merge differently where the pieces meet; drop context, then prefix lines.
    ids = assemble(n_chunks, header, kept_prefix, kept_suffix)
    while len(ids) > config.max_prompt_tokens:
        if n_chunks:
            n_chunks -= 1
        elif header:
            header = ""
        elif "\n" in kept_prefix[:-1]:
            kept_prefix = kept_prefix[kept_prefix.index("\n") + 1:]
        elif kept_prefix:
            kept_prefix = kept_prefix[1:]
        elif kept_suffix:
            kept_suffix = kept_suffix[:-1]
        else:  # pragma: no cover - the markers alone fit, checked above
            raise PromptError(f"cannot fit a prompt in {config.max_prompt_tokens} ids")
        ids = assemble(n_chunks, header, kept_prefix, kept_suffix)
    return Prompt(ids=ids, prefix=kept_prefix, suffix=kept_suffix, context=context_text(n_chunks, header),
                  n_chunks=n_chunks)
