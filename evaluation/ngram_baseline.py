"""A non-neural FIM baseline: copy from the visible file, else the most frequent continuation in the train files.

Built from the train files of the same source the model was trained on, with the model's own tokenizer, so
its numbers sit beside the model's on identical prompts (it answers the same `complete(prompt_ids, max_new,
stop_ids)` calls as the model, see infilling.py). It reads the prefix and suffix back out of the FIM prompt
(either layout) and writes one line, token by token, each token chosen as:

  1. copy   the longest run of the last 8..3 tokens before the cursor that also occurs earlier in the prefix
            or anywhere in the suffix (the prefix wins a tie); the token that followed its latest occurrence.
            Editors repeat identifiers and whole lines from the same file; this is the "copy model".
  2. n-gram the most frequent next token after the last 3, else 2, else 1 tokens in the train files, else the
            most frequent token overall (stupid backoff; ties go to the lowest id).

It stops after the first newline that ends a line with some text on it (the hidden spans are whole lines;
one line is the most it can guess), or at max_new tokens, and ends its answer with <EOT>.

Counting is exact, not hashed: a context of up to 3 ids and the next id pack into one uint64 (16 bits each,
so vocabularies up to 65,536), counted with numpy.unique; the table keeps, per context, its best next id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from .eval_error import EvalError

ORDER = 3            # longest n-gram context, in tokens
COPY_MIN, COPY_MAX = 3, 8


def _pack(tokens: np.ndarray, k: int) -> np.ndarray:
    """uint64 key of the k tokens ending at each position i >= k-1 (oldest in the highest bits)."""
    key = np.zeros(len(tokens) - k + 1, np.uint64)
    for j in range(k):
        key = (key << np.uint64(16)) | tokens[j:len(tokens) - k + 1 + j].astype(np.uint64)
    return key


class NgramBaseline:
    def __init__(self, tok, documents: Iterable[str]):
        """Count n-grams over `documents` (texts), each encoded with `tok` and started with BOS."""
        if tok.vocab_size > 1 << 16:
            raise EvalError(f"the n-gram baseline packs ids in 16 bits; vocabulary {tok.vocab_size} is too large")
        self.tok = tok
        self.newline = tok.piece_to_id("<0x0A>")
        if self.newline is None:
            raise EvalError(f"tokenizer {tok.path} has no <0x0A> byte piece; the baseline needs it to end a line")
        parts = [np.array([tok.bos_id] + tok.encode(text), np.int64) for text in documents]
        if not parts:
            raise EvalError("the n-gram baseline needs at least one training document")
        tokens = np.concatenate(parts)
        self.n_tokens = len(tokens)
        self.unigram = int(np.bincount(tokens, minlength=tok.vocab_size).argmax())
        self.tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for k in range(1, ORDER + 1):
            context = _pack(tokens[:-1], k)                     # contexts ending at i, for i in [k-1, n-2]
            following = tokens[k:].astype(np.uint64)            # the token after each of them
            pairs, counts = np.unique((context << np.uint64(16)) | following, return_counts=True)
            ctx = pairs >> np.uint64(16)
            order = np.lexsort((-counts, ctx))                  # by context, then most frequent first
            ctx, nxt = ctx[order], (pairs[order] & np.uint64(0xFFFF)).astype(np.int64)
            first = np.unique(ctx, return_index=True)[1]
            self.tables[k] = (ctx[first], nxt[first])

    def next_from_counts(self, context: Sequence[int]) -> int:
        for k in range(min(ORDER, len(context)), 0, -1):
            key = np.uint64(0)
            for t in context[-k:]:
                key = (key << np.uint64(16)) | np.uint64(t)
            keys, best = self.tables[k]
            i = int(np.searchsorted(keys, key))
            if i < len(keys) and keys[i] == key:
                return int(best[i])
        return self.unigram

    @staticmethod
    def next_from_copy(context: Sequence[int], visible: Sequence[int]) -> tuple[int, int] | None:
        """(match length, token) for the token after the latest occurrence in `visible` of the longest tail of
        `context` (COPY_MAX..COPY_MIN tokens) that is followed by something; None when there is none."""
        n = len(visible)
        for k in range(min(COPY_MAX, len(context)), COPY_MIN - 1, -1):
            tail = list(context[-k:])
            for start in range(n - k - 1, -1, -1):
                if visible[start] == tail[0] and list(visible[start:start + k]) == tail:
                    return k, int(visible[start + k])
        return None

    def split_prompt(self, prompt: Sequence[int]) -> tuple[list[int], list[int]]:
        """(prefix ids, suffix ids) of a PSM or SPM prompt from model.fim.infilling_prompt_tokens."""
        t = self.tok
        ids = list(prompt)
        if t.middle_id not in ids or t.suffix_id not in ids:
            raise EvalError(f"not an infilling prompt (no <SUF>/<MID>): {ids[:12]}...")
        mid, suf = ids.index(t.middle_id), ids.index(t.suffix_id)
        if suf < mid and ids[suf - 1] == t.prefix_id and suf == 2:  # SPM: BOS PRE SUF suffix MID prefix
            return ids[mid + 1:], ids[suf + 1:mid]
        return ids[2:suf], ids[suf + 1:mid]                         # PSM: BOS PRE prefix SUF suffix MID

    def complete(self, prompt: Sequence[int], max_new_tokens: int, stop_ids: frozenset[int],
                 min_new_tokens: int = 0) -> list[int]:
        """Greedy ids up to the end of the first line with text. `min_new_tokens` changes nothing: the counts
        come from plain documents without <EOT> or EOS, so no stop id is ever the best next token."""
        prefix, suffix = self.split_prompt(prompt)
        context = [self.tok.bos_id] + prefix
        out: list[int] = []
        text_on_line = False
        for _ in range(max_new_tokens):
            # The longest copy from the text before the cursor or from the suffix (the prefix wins a tie).
            copies = [c for c in (self.next_from_copy(context, context[:-1]),
                                  self.next_from_copy(context, suffix)) if c is not None]
            if copies:
                token = max(copies, key=lambda c: c[0])[1]
            else:
                token = self.next_from_counts(context)
            if token in stop_ids:
                break
            out.append(token)
            context.append(token)
            if token == self.newline:
                if text_on_line:
                    break
            elif self.tok.piece(token).strip("▁ \t"):
                text_on_line = True
        return out + [self.tok.eot_id]
