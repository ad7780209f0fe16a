"""Fill-in-the-middle training examples, Code Llama's way (Rozière et al. 2023, section 2.3).

A source file is first cut into windows that fit a row: at line boundaries, greedily, each window at most
`row_length - FIM_OVERHEAD` tokens (a single over-long line is cut inside). Then each window, with its own
random stream seeded by (seed, path, window index), becomes one example:

  - with probability 1 - fim_rate, plain left-to-right:  [BOS] + encode(window) (+ [EOS] if it ends the file)
  - otherwise two cut points are drawn uniformly over the window's characters (sorted: i <= j), giving
    prefix = w[:i], middle = w[i:j], suffix = w[j:], and with probability spm_rate the SPM layout, else PSM:

    PSM: [BOS, <PRE>] + encode(prefix) + [<SUF>] + encode_infilling(suffix) + [<MID>] + encode_infilling(middle) + [<EOT>]
         = infilling_prompt_tokens(tok, prefix, suffix) + encode_infilling(middle) + [<EOT>]
    SPM: [BOS, <PRE>, <SUF>] + encode_infilling(suffix) + [<MID>] + encode(prefix + middle) + [<EOT>]

The SPM rule follows the paper, which encodes the prefix and the middle together in SPM: prefix + middle is
tokenized as ordinary left-to-right text, with no split sub-token at the cut (PSM, which encodes them apart,
has one where the cut falls inside a token). So the prompt part of an SPM example,
infilling_prompt_tokens(tok, prefix, suffix, spm=True), is a token prefix of the example only when the cut
falls on a token boundary. Only the suffix and (in PSM) the middle lose SentencePiece's implicit leading
space, as in the paper and Meta's inference code.

Other families (model/families.py) get their own markers and end token through the tokenizer (Qwen2.5-Coder:
no BOS, <|endoftext|> after the middle; DeepSeek-Coder: <｜end▁of▁sentence｜>), and PSM only.

Five options depart from the paper, all off by default; the standard-library recipe
(recipes/codefill-stdlib.toml) uses all five, the bundled recipe (recipes/codefill-pypi-cpu.toml) all but passes:

  - line_rate: that share of infilling examples draws its two cut points among the window's line starts
    (offset 0, every offset after a newline, and the end) instead of among all characters, so the middle is
    whole lines and <EOT> follows a line break, where an editor's cursor usually stands when a suggestion
    is wanted. The extra draw is made only when line_rate > 0, so other streams are unchanged.
  - line_lines: a line-cut middle is 1 to line_lines whole lines (uniform), starting at a line start drawn
    uniformly, instead of everything between two line starts (a third of the window on average). That is
    the length an editor asks for, so where the middle ends, and <EOT> with it, is learnt from examples
    like the ones served.
  - window_tokens: windows of at most that many tokens instead of a whole row's worth: shorter documents,
    hence more infilling examples (and <EOT> targets) for the same tokens.
  - passes: the train files are turned into examples that many times, pass k with seed + k, so every
    epoch of a long run sees other cut points and layouts of the same code (written by tokenize_fim; the
    training permutation mixes the passes).
  - pack: whole examples are placed greedily into rows (an example never straddles two rows, so every
    middle has its prompt in its row) instead of one padded example per row. Attention crosses the
    examples of a row, as it crosses documents in pretraining; each starts with BOS.

Another departure: Code Llama applied FIM only to documents not cut across training contexts. We
cut long files into windows first and treat every window as a document, so long files also yield infilling
examples (an editor's prompt is a window of a file too); fim_rate=0 gives plain left-to-right windows only.

Every token is a training target (labels = ids, the trainer shifts), as in the FIM papers; one example per
row, padded. Seeding per window makes an example depend only on its own file, so adding a file to the corpus
changes no other file's examples.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from codefill.model.fim import infilling_prompt_tokens

if TYPE_CHECKING:  # annotations only: the recipe and the PyTorch trainer load this module without SentencePiece
    from codefill.model.tokenizer import Tokenizer

from .data_error import DataError

# Tokens a window's encoding can grow by in an example: BOS, <PRE>, <SUF>, <MID>, <EOT> and a few more from
# re-encoding the three parts separately (each cut can split one token in two) and the leading space.
FIM_OVERHEAD = 8


@dataclass
class FimConfig:
    fim_rate: float = 0.9   # share of windows turned into infilling examples; the rest stay left-to-right
    spm_rate: float = 0.5   # share of infilling examples in SPM layout; the rest are PSM
    seed: int = 0
    line_rate: float = 0.0  # share of infilling examples cut at line starts (whole-line middles)
    line_lines: int = 0     # 0: a line-cut middle spans two random line starts; else 1..line_lines lines
    window_tokens: int = 0  # 0: windows as long as a row allows; else at most this many tokens
    pack: bool = False      # whole examples packed greedily into rows instead of one example per row
    passes: int = 1         # train data written this many times, pass k drawn with seed + k

    def __post_init__(self):
        for name in ("fim_rate", "spm_rate", "line_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise DataError(f"{name} must be a number in [0, 1], got {value!r}")
        if isinstance(self.window_tokens, bool) or not isinstance(self.window_tokens, int) or not (
                self.window_tokens == 0 or self.window_tokens >= 8):
            raise DataError(f"window_tokens must be 0 (a row's worth) or an integer >= 8, got {self.window_tokens!r}")
        if isinstance(self.line_lines, bool) or not isinstance(self.line_lines, int) or self.line_lines < 0:
            raise DataError(f"line_lines must be an integer >= 0, got {self.line_lines!r}")
        if self.line_lines and not self.line_rate:
            raise DataError(f"line_lines {self.line_lines} needs line_rate > 0: it shapes the line-cut middles")
        if isinstance(self.passes, bool) or not isinstance(self.passes, int) or self.passes < 1:
            raise DataError(f"passes must be an integer >= 1, got {self.passes!r}")
        if not isinstance(self.pack, bool):
            raise DataError(f"pack must be true or false, got {self.pack!r}")

    def window_limit(self, row_length: int) -> int:
        """Tokens a window may have in rows of `row_length`: window_tokens, or the row less the FIM pieces."""
        room = row_length - FIM_OVERHEAD
        if self.window_tokens > room:
            raise DataError(f"window_tokens {self.window_tokens} does not fit a row of {row_length} tokens "
                            f"(at most {room}: the row less {FIM_OVERHEAD} for the FIM pieces)")
        return self.window_tokens or room


@dataclass
class FimExample:
    kind: str          # "psm", "spm" or "plain"
    ids: list[int]
    prefix: str = ""   # for "plain": the whole window is in `prefix`
    middle: str = ""
    suffix: str = ""


@dataclass
class FimCounts:
    files: int = 0
    windows: int = 0
    psm: int = 0
    spm: int = 0
    plain: int = 0
    dropped_too_long: int = 0   # examples that outgrew the row after the transform (should stay 0)
    passes: int = 1             # every file is counted once per pass

    def report(self) -> str:
        files = f"{self.files // self.passes} x {self.passes} passes" if self.passes > 1 else f"{self.files}"
        return (f"  source files: {files}, windows: {self.windows}; examples: psm {self.psm}, "
                f"spm {self.spm}, plain {self.plain}; dropped (too long): {self.dropped_too_long}")


# --- windows ------------------------------------------------------------------------------------------


def _halve(text: str) -> tuple[str, str]:
    """Two non-empty parts, cut at the line start nearest below the middle, else above, else mid-line."""
    mid = len(text) // 2
    cut = text.rfind("\n", 0, mid) + 1
    if cut <= 0:
        cut = text.find("\n", mid) + 1
    if not 0 < cut < len(text):
        cut = mid
    return text[:cut], text[cut:]


def _fit(tok: Tokenizer, text: str, max_tokens: int) -> list[str]:
    """Halve until every part's exact encoding has at most `max_tokens` tokens."""
    if len(text) <= 1 or len(tok.encode(text)) <= max_tokens:
        return [text]
    a, b = _halve(text)
    return _fit(tok, a, max_tokens) + _fit(tok, b, max_tokens)


def split_into_windows(tok: Tokenizer, text: str, max_tokens: int) -> list[str]:
    """Consecutive pieces of `text` ("".join gives it back) whose encodings have at most `max_tokens` tokens.

    Lines are packed greedily by their own token counts (an estimate: encoding a join can differ by a
    token or so), then each window is checked exactly and halved at line boundaries where needed."""
    if max_tokens < 8:
        raise DataError(f"windows of {max_tokens} tokens are too small; use a larger seq_length")
    if len(tok.encode(text)) <= max_tokens:
        return [text]
    windows: list[str] = []
    current: list[str] = []
    current_tokens = 0
    for line in text.splitlines(keepends=True):
        n = len(tok.encode(line))
        if current and current_tokens + n > max_tokens:
            windows.append("".join(current))
            current, current_tokens = [], 0
        current.append(line)
        current_tokens += n
    if current:
        windows.append("".join(current))
    return [part for window in windows for part in _fit(tok, window, max_tokens)]


# --- the transform ------------------------------------------------------------------------------------


def psm_ids(tok: Tokenizer, prefix: str, middle: str, suffix: str) -> list[int]:
    return infilling_prompt_tokens(tok, prefix, suffix, spm=False) + tok.encode_infilling(middle) + [tok.eot_id]


def spm_ids(tok: Tokenizer, prefix: str, middle: str, suffix: str) -> list[int]:
    # Not infilling_prompt_tokens(spm=True) + middle: prefix and middle are encoded together (see above).
    return ([tok.bos_id, tok.prefix_id, tok.suffix_id] + tok.encode_infilling(suffix) + [tok.middle_id]
            + tok.encode(prefix + middle) + [tok.eot_id])


def line_starts(window: str) -> list[int]:
    """Offsets where a line starts, and the end: the cut points of a whole-line middle."""
    starts = [0] + [k + 1 for k, c in enumerate(window) if c == "\n"]
    return starts if starts[-1] == len(window) else starts + [len(window)]


def fim_example(tok: Tokenizer, window: str, rng: random.Random, config: FimConfig, *,
                ends_file: bool = True) -> FimExample:
    """One example from one window; all randomness comes from `rng`, in a fixed order of draws."""
    if rng.random() >= config.fim_rate:
        return FimExample("plain", tok.encode(window, bos=True, eos=ends_file), prefix=window)
    if config.line_rate > 0 and rng.random() < config.line_rate:
        starts = line_starts(window)
        if config.line_lines:
            first = rng.randrange(len(starts) - 1) if len(starts) > 1 else 0
            i, j = starts[first], starts[min(first + rng.randint(1, config.line_lines), len(starts) - 1)]
        else:
            i, j = sorted((rng.choice(starts), rng.choice(starts)))
    else:
        i, j = sorted((rng.randint(0, len(window)), rng.randint(0, len(window))))
    prefix, middle, suffix = window[:i], window[i:j], window[j:]
    # The SPM draw is made for every family, so streams do not depend on it; a family trained without SPM
    # (Qwen2.5-Coder, DeepSeek-Coder: families.py) gets PSM, the layout it will be prompted with.
    if rng.random() < config.spm_rate and tok.family.spm:
        return FimExample("spm", spm_ids(tok, prefix, middle, suffix), prefix, middle, suffix)
    return FimExample("psm", psm_ids(tok, prefix, middle, suffix), prefix, middle, suffix)


def window_rng(seed: int, path: str, index: int) -> random.Random:
    # A str seed is hashed with SHA-512 by random.Random: the same stream in every process and Python run.
    return random.Random(f"{seed}\0{path}\0{index}")


def fim_rows(tok: Tokenizer, sources: Iterable[tuple[str, str]], row_length: int, config: FimConfig,
             counts: FimCounts | None = None) -> Iterator[tuple[list[int], list[int]]]:
    """(ids, labels) rows, unpadded, from (path, text) pairs; tallies go into `counts`."""
    if not tok.has_infilling:
        raise DataError(f"tokenizer {tok.path} has no infilling pieces; FIM data needs a tokenizer with its "
                        f"family's FIM tokens ({tok.family.name}; for Code Llama the 7B/13B base one, not a "
                        f"Python or 34B one)")
    window_tokens = config.window_limit(row_length)
    counts = counts if counts is not None else FimCounts()
    row: list[int] = []
    for path, text in sources:
        counts.files += 1
        windows = split_into_windows(tok, text, window_tokens)
        for index, window in enumerate(windows):
            counts.windows += 1
            example = fim_example(tok, window, window_rng(config.seed, path, index), config,
                                  ends_file=index == len(windows) - 1)
            if len(example.ids) > row_length:
                counts.dropped_too_long += 1
                continue
            setattr(counts, example.kind, getattr(counts, example.kind) + 1)
            if not config.pack:
                yield example.ids, list(example.ids)
                continue
            if row and len(row) + len(example.ids) > row_length:
                yield row, list(row)
                row = []
            row.extend(example.ids)
    if row:
        yield row, list(row)


def fim_pass_rows(tok: Tokenizer, sources: Iterable[tuple[str, str]], row_length: int, config: FimConfig,
                  counts: FimCounts | None = None) -> Iterator[tuple[list[int], list[int]]]:
    """The rows of every pass of `config.passes`: pass k is fim_rows with seed + k, so each pass cuts the same
    files at other points. One pass streams `sources`; more read them into memory once."""
    sources = sources if config.passes == 1 else list(sources)
    for k in range(config.passes):
        yield from fim_rows(tok, sources, row_length, replace(config, seed=config.seed + k), counts)
