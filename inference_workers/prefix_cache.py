"""What each KV-cache slot holds, and which slot a new prompt should go to.

The runner's cache has `max_batch` slots of `max_seq_len` positions (the memory bound: slots x positions x
layers x KV heads x head dim, fixed when the runner is built). A slot keeps the keys/values of the last
sequence that ran in it after its request ends, so the slots double as an LRU cache of sequences. For each
slot this module records:

    tokens     the ids whose keys/values are in the cache, positions 0..len-1
    pending    the last sampled id, sent to the client but not yet fed to the model (None: none)
    greedy_from  index into seq = tokens + [pending] from which every id is the model's argmax given the ids
               before it, with `logprobs` for each; None if the sequence was not decoded greedily

A new prompt takes the free slot whose seq shares the longest prefix with it (ties: least recently used):

- its shared prefix is not prefilled again, only the rest (prefix reuse). Entries past what is reused stay
  in the cache but are never attended to, since attention reads positions < the row's position: rolling
  back is just prefilling from an earlier position.
- if the prompt is a prefix of seq at or after greedy_from and the request is greedy, the ids after the
  prompt are exactly what greedy decoding of the prompt would produce, so they are handed to the request at
  once without running the model (in-flight extension: the user typed the first characters of the
  suggestion). The decode then continues from the end of seq.

This module is bookkeeping only; it never touches the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Slot:
    index: int
    tokens: list[int] = field(default_factory=list)
    pending: int | None = None
    greedy_from: int | None = None
    logprobs: list[float] = field(default_factory=list)  # of seq[greedy_from:]
    last_used: int = 0
    owner: object | None = None  # the request holding the slot, None when free

    @property
    def seq(self) -> list[int]:
        return self.tokens + ([self.pending] if self.pending is not None else [])

    def forget_from(self, n: int) -> None:
        """Keep only tokens[:n] (a rollback or a prefill over them); nothing after is greedy any more."""
        del self.tokens[n:]
        self.pending, self.greedy_from, self.logprobs = None, None, []


@dataclass(frozen=True)
class Match:
    slot: int
    reuse: int  # prompt ids already in the cache: prefill prompt[reuse:] from position `reuse` (unless replay
    # or feed_pending: then the slot's state is taken as it is)
    replay: list[tuple[int, float]]  # (id, logprob) after the prompt, known without running the model
    feed_pending: bool  # the prompt ends with the slot's pending id: no prefill, decode it next

    @property
    def score(self) -> int:
        return self.reuse + (1 if self.feed_pending else 0) + len(self.replay)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    def __init__(self, n_slots: int, prefix_reuse: bool = True, inflight_extension: bool = True):
        self.slots = [Slot(i) for i in range(n_slots)]
        self.prefix_reuse = prefix_reuse
        self.inflight_extension = inflight_extension
        self._clock = 0

    def free_slots(self) -> list[Slot]:
        return [s for s in self.slots if s.owner is None]

    def match(self, slot: Slot, prompt: Sequence[int], greedy: bool, stop_ids: frozenset[int] = frozenset(),
              min_new_tokens: int = 0) -> Match:
        """How much of `prompt` slot `slot` already holds (see the module docstring). A request that may not
        stop before `min_new_tokens` ids gets no replay with one of `stop_ids` among its first ones."""
        seq = slot.seq
        c = common_prefix(prompt, seq)
        if self.inflight_extension and greedy and c == len(prompt) and slot.greedy_from is not None \
                and slot.greedy_from <= len(prompt) < len(seq) \
                and not stop_ids.intersection(seq[len(prompt):len(prompt) + min_new_tokens]):
            lp = slot.logprobs[len(prompt) - slot.greedy_from:]
            return Match(slot.index, len(prompt), list(zip(seq[len(prompt):], lp)), False)
        if (self.prefix_reuse or self.inflight_extension) and slot.pending is not None \
                and c == len(prompt) == len(seq):
            return Match(slot.index, len(slot.tokens), [], True)
        if not self.prefix_reuse:
            return Match(slot.index, 0, [], False)
        # at least one id must be prefilled, to get the logits of the prompt's last position
        return Match(slot.index, min(c, len(slot.tokens), len(prompt) - 1), [], False)

    def best(self, prompt: Sequence[int], greedy: bool, stop_ids: frozenset[int] = frozenset(),
             min_new_tokens: int = 0) -> Match | None:
        """The free slot that saves the most work for `prompt`; None if every slot is taken."""
        free = self.free_slots()
        if not free:
            return None
        matches = [(self.match(s, prompt, greedy, stop_ids, min_new_tokens), s) for s in free]
        return max(matches, key=lambda ms: (ms[0].score, -ms[1].last_used))[0]

    def acquire(self, index: int, owner: object) -> Slot:
        slot = self.slots[index]
        if slot.owner is not None:
            raise RuntimeError(f"slot {index} is held by {slot.owner!r}; cannot give it to {owner!r}")
        slot.owner = owner
        self.touch(slot)
        return slot

    def release(self, slot: Slot) -> None:
        slot.owner = None
        self.touch(slot)

    def touch(self, slot: Slot) -> None:
        self._clock += 1
        slot.last_used = self._clock
