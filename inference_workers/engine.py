"""The serving engine on rank 0: a queue, cache slots, and one model step at a time.

It knows nothing about sockets or text: requests come in as `GenerateRequest`s with the client's routing
identity, and every reply goes out through `emit(identity, message)`. The model is driven only through
`runner.Runner` (prefill, decode_step, reload), the same class at any tensor-parallel size.

One iteration (`step`), all scheduling decided under the lock, model calls made outside it:

1. finish requests that were cancelled or whose deadline passed (a queued one is dropped unstarted);
2. in-flight extension: a queued greedy request whose prompt strictly extends the prompt of an active greedy
   request *from the same client* supersedes it (Finished SUPERSEDED) and takes over its slot: the ids the
   model already produced past the new prompt are streamed at once, and a divergence rolls the slot back;
3. admit queued requests into free slots, each into the slot sharing the longest prefix (prefix_cache.py);
4. prefill: up to `prefill_chunk` prompt ids in total this iteration (a long prompt is spread over several
   iterations), so decodes already running wait at most one chunk. A prompt with a single id left to run
   (the usual keystroke) skips this: its last id is fed by the decode step below;
5. one decode step over every slot: each decoding request gets its next token (continuous batching: a
   request whose prefill finished in 4. decodes in the same iteration).

Faults: every runner call is timed. The socket loop calls `check_watchdog()`; a call running longer than
`step_timeout_s` (a hung model, a tensor-parallel rank that died inside a collective) fails the engine: every
queued and active request gets ErrorReply + Finished(ERROR), health turns not ready, and new requests are
refused the same way. The model thread may stay stuck in that call; it is a daemon thread and the engine
never touches its results. A runner call that raises ValueError (a request the model refuses) fails the
requests in that call only; any other exception means the model is broken and fails the engine.

Reloading weights (`reload`, a ReloadWeights message): no request may see two sets of weights, so the switch
happens when none is active. From the moment a reload is pending, nothing is admitted (no slot is given out,
no in-flight extension); requests already holding a slot run to their end on the old weights, new ones wait
in the queue. When the last one finishes, the model thread checks the tokenizer (the stop-rule table must
stay valid), calls `runner.reload` (which loads and checks everything, on every rank, before switching
anything), forgets every cached slot (their keys/values came from the old weights) and answers `Reloaded`;
then admission resumes. A refused reload (ValueError) changes nothing; any other exception fails the engine,
since the weights may be half-switched. The call runs under the watchdog with `reload_timeout_s`.
"""

from __future__ import annotations

import collections
import enum
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from codefill.model.sampling import SamplingConfig, log_softmax, sample, without

from .prefix_cache import Match, PrefixCache, Slot, common_prefix
from .speculation_gate import SpeculationGate
from .protocol import ErrorReply, Finished, FinishReason, GenerateRequest, Message, Pong, Reloaded, ReloadWeights, \
    Token
from .stops import StopRuleError, StopState

Emit = Callable[[bytes, Message], None]


@dataclass(frozen=True)
class EngineConfig:
    max_queue: int = 64  # requests waiting for a slot; one more is answered OVERLOADED at once
    prefill_chunk: int = 256  # prompt ids prefilled per iteration, over all requests
    step_timeout_s: float = 120.0  # one runner call longer than this fails the engine (covers first compiles)
    drain_timeout_s: float = 10.0  # on SIGTERM, how long in-flight requests may still run
    prefix_reuse: bool = True  # prefill only what a cached slot does not already hold
    inflight_extension: bool = True  # continue (or take over) a greedy decode the new prompt extends
    reload_timeout_s: float = 600.0  # loading new weights (every rank) longer than this fails the engine
    speculate: int = 4  # a lone greedy request drafts up to this many ids from its own context (0: off)

    def __post_init__(self) -> None:
        if self.max_queue < 0 or self.prefill_chunk < 1 or self.step_timeout_s <= 0 or self.drain_timeout_s < 0 \
                or self.reload_timeout_s <= 0 or not 0 <= self.speculate <= 64:
            raise ValueError(f"bad EngineConfig: {self}")


class State(enum.Enum):
    QUEUED = 1
    PREFILL = 2
    DECODE = 3
    DONE = 4


@dataclass(eq=False)
class Request:
    identity: bytes
    req: GenerateRequest
    received: float  # time.monotonic()
    stops: StopState
    sampling: SamplingConfig
    rng: np.random.Generator | None
    state: State = State.QUEUED
    slot: Slot | None = None
    prefilled: int = 0  # prompt ids in the slot's cache
    feed: int | None = None  # the id the next decode step feeds
    n_reused: int = 0
    n_replayed: int = 0
    cancelled: bool = False
    deadline: float | None = None
    heal: bytes = b""  # token healing: bytes the generated text must still start with

    @property
    def key(self) -> tuple[bytes, str]:
        return self.identity, self.req.request_id

    @property
    def greedy(self) -> bool:
        """Greedy and unconstrained: its continuation is the prompt's greedy continuation, which the prefix
        cache records and may replay to, or let be taken over by, a later request. A healing request samples
        from constrained logits, so it only reuses the KV cache."""
        return self.req.greedy and not self.req.required_prefix

    @property
    def prompt(self) -> list[int]:
        return self.req.prompt_ids


class Engine:
    def __init__(self, runner, config: EngineConfig = EngineConfig(), table=None, emit: Emit | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.runner, self.config, self.table = runner, config, table
        self.emit: Emit = emit or (lambda identity, msg: None)
        self.clock = clock
        self.cache = PrefixCache(runner.max_batch, config.prefix_reuse, config.inflight_extension)
        self.queue: collections.deque[Request] = collections.deque()
        self.active: dict[tuple[bytes, str], Request] = {}
        # Guards everything above and below; never held during a runner call, so the socket loop can
        # always answer health, queue, cancel and run the watchdog.
        self.lock = threading.Condition()
        self.failed: str | None = None
        self.draining = False
        self.closed = False
        self._call_started: float | None = None
        self._call_what = ""
        self._call_limit = config.step_timeout_s
        self._reload: tuple[bytes, ReloadWeights] | None = None  # pending: admission is stopped until it ran
        self.weights_version = 0  # reloads completed
        self.drafted = self.accepted = 0  # speculation: ids drafted, and of those, kept
        self.gate = SpeculationGate()  # whether a verify step currently pays for itself
        self._thread: threading.Thread | None = None
        self._heal_masks: dict[bytes, np.ndarray] = {}  # token healing: required bytes -> allowed tokens

    # --- the socket side: each call takes the lock briefly and never runs the model ----------------------

    def submit(self, identity: bytes, req: GenerateRequest) -> None:
        with self.lock:
            now = self.clock()
            if self.failed is not None:
                return self._refuse(identity, req, FinishReason.ERROR, f"model not ready: {self.failed}")
            if self.draining:
                return self._refuse(identity, req, FinishReason.OVERLOADED,
                                    "draining: the worker is shutting down and admits no new requests")
            if (identity, req.request_id) in self.active or any(r.key == (identity, req.request_id)
                                                                 for r in self.queue):
                return self._refuse(identity, req, FinishReason.ERROR,
                                    f"request id {req.request_id!r} is already in flight on this connection")
            problem = self._check(req)
            if problem is not None:
                return self._refuse(identity, req, FinishReason.ERROR, problem)
            if len(self.queue) >= self.config.max_queue:
                return self._refuse(identity, req, FinishReason.OVERLOADED,
                                    f"overloaded: {len(self.queue)} requests queued (max_queue "
                                    f"{self.config.max_queue}), {len(self.active)} running")
            sampling = SamplingConfig(req.temperature, req.top_k, req.top_p, req.seed)
            r = Request(identity, req, now, StopState.of(req, self.table), sampling,
                        None if sampling.greedy else sampling.rng(),
                        deadline=now + req.deadline_ms / 1000.0 if req.deadline_ms > 0 else None,
                        heal=req.required_prefix.encode("utf-8"))
            self.queue.append(r)
            self.lock.notify_all()

    def cancel(self, identity: bytes, request_id: str) -> None:
        """Queued: finished now. Active: finished at the start of the next iteration (after the model call
        in progress, if any, whose cache writes are kept). Unknown or already finished: nothing to do."""
        with self.lock:
            for r in self.queue:
                if r.key == (identity, request_id):
                    self._finish(r, FinishReason.CANCELLED)
                    return
            r = self.active.get((identity, request_id))
            if r is not None:
                r.cancelled = True
                self.lock.notify_all()

    def reload(self, identity: bytes, msg: ReloadWeights) -> None:
        """Switch weights once no request is active (see the module docstring); answered with Reloaded."""
        with self.lock:
            problem = (f"model not ready: {self.failed}" if self.failed is not None
                       else "draining: the worker is shutting down" if self.draining
                       else f"a reload of {self._reload[1].model_dir} is already pending" if self._reload is not None
                       else None)
            if problem is not None:
                self.emit(identity, Reloaded(msg.request_id, False, f"reload refused: {problem}"[:4096],
                                             self.weights_version))
                return
            self._reload = (identity, msg)
            self.lock.notify_all()

    def health(self, nonce: int) -> Pong:
        with self.lock:
            reason = self.failed or ("draining" if self.draining else "")
            return Pong(nonce, os.getpid(), not reason, len(self.queue), len(self.active), self.runner.max_batch,
                        self.runner.max_seq_len, reason[:4096])

    def check_watchdog(self) -> None:
        with self.lock:
            started = self._call_started
            if self.failed is None and started is not None:
                running = self.clock() - started
                if running > self._call_limit:
                    limit = "step_timeout_s" if self._call_limit == self.config.step_timeout_s else "reload_timeout_s"
                    self._fail(f"model step hung: {self._call_what} has run for {running:.1f} s "
                               f"({limit} {self._call_limit})")

    def drain(self) -> None:
        """Stop admitting; what is queued or running goes on (see `idle`, `abort_all`)."""
        with self.lock:
            self.draining = True

    def idle(self) -> bool:
        with self.lock:
            return not self.queue and not self.active and self._reload is None

    def abort_all(self, message: str) -> None:
        with self.lock:
            for r in list(self.queue) + list(self.active.values()):
                self._finish(r, FinishReason.ERROR, message)
            self._answer_reload(False, message)

    # --- the model thread ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="codefill-engine", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the model thread (it finishes the call it is in). Requests still held are not answered."""
        with self.lock:
            self.closed = True
            self.lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)  # a thread stuck in a hung call stays behind (daemon)

    def _run(self) -> None:
        while True:
            with self.lock:
                while not (self.closed or self.failed) and not (self.queue or self.active or self._reload):
                    self.lock.wait()
                if self.closed or self.failed:
                    return
            try:
                self.step()
            except Exception as e:  # a bug in the engine itself: no request can be trusted to finish
                traceback.print_exc(file=sys.stderr)
                with self.lock:
                    self._fail(f"engine error: {type(e).__name__}: {e}")
                return

    def run_until_idle(self, max_steps: int = 100_000) -> None:
        """Step in the calling thread until nothing is queued or active (tests, without the thread)."""
        for _ in range(max_steps):
            if not self.step():
                return
        raise RuntimeError(f"engine still busy after {max_steps} steps")

    def step(self) -> bool:
        """One iteration (see the module docstring); False when there was nothing to do."""
        with self.lock:
            if self.closed or self.failed:
                return False
            self._schedule()
            if self._reload is not None and not self.active:
                return self._reload_now(self._reload)
            prefills = self._plan_prefills()
            if not prefills and not any(r.state is State.DECODE for r in self.active.values()):
                return bool(self.queue or self.active)
        for r, ids, start in prefills:
            slot = r.slot
            logits = self._call(f"prefill of {len(ids)} ids into slot {slot.index} at position {start}",
                                lambda: self.runner.prefill(ids, slot.index, start), [r])
            with self.lock:
                if self.failed or self.closed:
                    return False
                if logits is not None and r.state is State.PREFILL:
                    self._prefilled(r, ids, logits)
        with self.lock:
            if self.failed or self.closed:
                return False
            rows = [r for r in self.active.values() if r.state is State.DECODE]
            if not rows:
                return True
            draft = self._draft(rows[0]) if len(rows) == 1 else []
        if draft and self.gate.should_speculate():
            return self._speculate(rows[0], draft)
        with self.lock:
            tokens = [0] * self.runner.max_batch
            positions = [self.runner.idle_position] * self.runner.max_batch
            for r in rows:
                tokens[r.slot.index], positions[r.slot.index] = r.feed, len(r.slot.tokens)
        started = time.perf_counter()
        logits = self._call(f"decode step of {len(rows)} rows", lambda: self.runner.decode_step(tokens, positions),
                            rows)
        if len(rows) == 1 and logits is not None:
            self.gate.decoded(time.perf_counter() - started)
        with self.lock:
            if self.failed or self.closed:
                return False
            if logits is not None:
                for r in rows:
                    if r.state is State.DECODE:
                        self._decoded(r, logits[r.slot.index])
        return True

    # --- prompt-lookup speculation: several tokens per step for a lone greedy request ------------------

    def _draft(self, r: Request) -> list[int]:
        """Up to `speculate` ids that followed the latest earlier occurrence of the context's last n-gram
        (n = 3, then 2) in the request's own context: code repeats itself, and a wrong draft costs only the ids
        verified with it. Empty when the request may not speculate."""
        k = min(self.config.speculate, r.stops.max_new_tokens - r.stops.n_generated - 1,
                self.runner.max_seq_len - len(r.slot.tokens) - 1)
        if k < 1 or not r.greedy or r.heal:
            return []
        context = r.slot.tokens + [r.feed]
        for n in (3, 2):
            if len(context) <= n:
                continue
            tail = context[-n:]
            for start in range(len(context) - n - 1, -1, -1):
                if context[start:start + n] == tail:
                    return context[start + n:start + n + k]
        return []

    def _speculate(self, r: Request, draft: list[int]) -> bool:
        """Feed the request's next id and the draft in one step; keep what greedy decoding would have made."""
        slot = r.slot
        ids, start = [r.feed] + draft, len(slot.tokens)
        started = time.perf_counter()
        logits = self._call(f"verify of {len(ids)} ids in slot {slot.index} at position {start}",
                            lambda: self.runner.verify(ids, slot.index, start), [r])
        seconds = time.perf_counter() - started
        with self.lock:
            if self.failed or self.closed:
                return False
            if logits is None:
                return True
            self.drafted += len(draft)
            made = 0
            for i, row in enumerate(logits):
                if r.state is not State.DECODE:
                    break
                self._decoded(r, row)  # feeds ids[i], samples the next id
                made += 1
                if i == len(draft) or r.feed != draft[i]:
                    break  # the draft ends or differs: the cache past here holds ids greedy did not make
                self.accepted += 1
            self.gate.verified(seconds, made)
        return True

    # --- scheduling (under the lock) -------------------------------------------------------------------

    def _schedule(self) -> None:
        now = self.clock()
        for r in list(self.active.values()):
            if r.cancelled:
                self._finish(r, FinishReason.CANCELLED)
            elif r.deadline is not None and now > r.deadline:
                self._finish(r, FinishReason.DEADLINE)
        for r in list(self.queue):
            if r.deadline is not None and now > r.deadline:
                self._finish(r, FinishReason.DEADLINE)  # dropped before it ran
        if self._reload is not None:
            return  # admit nothing: what runs now finishes on the old weights, the queue waits for the new
        if self.config.inflight_extension:
            for r in list(self.queue):
                old = self._extended(r)
                if old is not None:
                    slot = old.slot
                    self._finish(old, FinishReason.SUPERSEDED)
                    self.queue.remove(r)
                    self._place(r, self.cache.match(slot, r.prompt, r.greedy, *self._hold(r)))
        while self.queue and self.cache.free_slots():
            r = self.queue.popleft()
            self._place(r, self.cache.best(r.prompt, r.greedy, *self._hold(r)))

    @staticmethod
    def _hold(r: Request) -> tuple[frozenset[int], int]:
        """The request's stop ids and how many ids must precede one (a replay may not end it sooner)."""
        return r.stops.stop_ids, r.stops.min_new_tokens

    def _extended(self, new: Request) -> Request | None:
        """The active request from the same client whose prompt `new`'s strictly extends (both greedy)."""
        if not new.greedy:
            return None
        for old in self.active.values():
            if old.identity == new.identity and old.greedy and len(new.prompt) > len(old.prompt) \
                    and common_prefix(new.prompt, old.prompt) == len(old.prompt):
                return old
        return None

    def _place(self, r: Request, m: Match) -> None:
        slot = self.cache.acquire(m.slot, r)
        r.slot, self.active[r.key] = slot, r
        r.n_reused = m.reuse
        if m.replay or m.feed_pending:
            # The slot's state is what this prompt would reach: no prefill. Stream what it already produced.
            r.state, r.prefilled, r.feed = State.DECODE, len(r.prompt), slot.pending
            for token, logprob in m.replay:
                r.n_replayed += 1
                if self._emit_token(r, token, logprob):
                    return
        elif len(r.prompt) - m.reuse == 1:
            # One id to go (a keystroke that added or changed the last token): it rides in the next decode
            # step with the other rows instead of costing a prefill call of its own.
            slot.forget_from(m.reuse)
            r.state, r.prefilled, r.feed = State.DECODE, len(r.prompt), r.prompt[-1]
        else:
            slot.forget_from(m.reuse)
            r.state, r.prefilled = State.PREFILL, m.reuse

    def _plan_prefills(self) -> list[tuple[Request, list[int], int]]:
        budget, plan = self.config.prefill_chunk, []
        for r in self.active.values():
            if r.state is State.PREFILL and budget > 0:
                ids = r.prompt[r.prefilled:r.prefilled + budget]
                plan.append((r, ids, r.prefilled))
                budget -= len(ids)
        return plan

    # --- results (under the lock) ----------------------------------------------------------------------

    def _prefilled(self, r: Request, ids: list[int], logits: np.ndarray) -> None:
        slot = r.slot
        slot.tokens.extend(ids)
        r.prefilled += len(ids)
        if r.prefilled < len(r.prompt):
            return
        held_back = self._held_back(r, logits)
        token, logprob = self._sample(r, logits)
        slot.pending = token
        greedy = r.greedy and not held_back
        slot.greedy_from, slot.logprobs = (len(r.prompt), [logprob]) if greedy else (None, [])
        r.state, r.feed = State.DECODE, token
        if r.cancelled:
            self._finish(r, FinishReason.CANCELLED)
        else:
            self._emit_token(r, token, logprob)

    def _decoded(self, r: Request, logits: np.ndarray) -> None:
        slot = r.slot
        slot.tokens.append(r.feed)  # the step wrote its keys/values
        held_back = self._held_back(r, logits)
        token, logprob = self._sample(r, logits)
        slot.pending = token
        if not r.greedy or held_back:
            slot.greedy_from, slot.logprobs = None, []
        elif slot.greedy_from is not None:
            slot.logprobs.append(logprob)
        elif r.stops.n_generated == 0:  # the first token, decoded from the prompt's last id
            slot.greedy_from, slot.logprobs = len(r.prompt), [logprob]
        r.feed = token
        if r.cancelled:
            self._finish(r, FinishReason.CANCELLED)
        else:
            self._emit_token(r, token, logprob)

    def _held_back(self, r: Request, logits: np.ndarray) -> bool:
        """True when holding back the stop ids (min_new_tokens) changes a greedy choice: the id chosen is not the
        model's argmax, so the slot must not record the continuation as the prompt's greedy one."""
        return r.stops.holds_back_stop_ids and int(np.argmax(logits)) in r.stops.stop_ids

    def _sample(self, r: Request, logits: np.ndarray) -> tuple[int, float]:
        """The next token and its log-prob under the unmodified softmax. While a healing prefix is pending,
        only tokens consistent with it may be chosen: their bytes extend it or lie inside it. Before
        min_new_tokens ids, no stop id may be chosen."""
        constrained = logits
        if r.heal:
            constrained = np.where(self._consistent(r.heal), logits, -np.inf)
        if r.stops.holds_back_stop_ids:
            constrained = without(constrained, r.stops.stop_ids)
        token = sample(constrained, r.sampling, r.rng)
        if r.heal:
            piece = self.table[token]
            r.heal = r.heal[len(piece):] if r.heal.startswith(piece) else b""
        return token, min(float(log_softmax(logits)[token]), 0.0)

    def _consistent(self, heal: bytes) -> np.ndarray:
        """[vocab] bool: tokens whose bytes are a non-empty prefix of `heal` or start with it (cached)."""
        mask = self._heal_masks.get(heal)
        if mask is None:
            mask = np.fromiter(((p.startswith(heal) or heal.startswith(p)) and len(p) > 0 for p in self.table),
                               dtype=bool, count=len(self.table))
            if len(self._heal_masks) > 256:
                self._heal_masks.clear()
            self._heal_masks[heal] = mask
        return mask

    def _emit_token(self, r: Request, token: int, logprob: float) -> bool:
        """Send one token and apply the stop rules; True if that finished the request."""
        self.emit(r.identity, Token(r.req.request_id, token, logprob))
        reason, text_bytes = r.stops.add(token)
        if reason is None:
            return False
        self._finish(r, reason, text_bytes=text_bytes)
        return True

    def _finish(self, r: Request, reason: FinishReason, message: str | None = None, text_bytes: int | None = None):
        if r.state is State.DONE:
            return
        if r.state is State.QUEUED:
            self.queue.remove(r)
        else:
            del self.active[r.key]
            self.cache.release(r.slot)
            r.slot = None
        r.state = State.DONE
        if message is not None:
            self.emit(r.identity, ErrorReply(r.req.request_id, message[:4096]))
        elapsed_ms = (self.clock() - r.received) * 1000.0
        self.emit(r.identity, Finished(r.req.request_id, reason, len(r.prompt), r.stops.n_generated, elapsed_ms,
                                       r.n_reused, r.n_replayed,
                                       r.stops.text_bytes if text_bytes is None else text_bytes))

    def _refuse(self, identity: bytes, req: GenerateRequest, reason: FinishReason, message: str) -> None:
        self.emit(identity, ErrorReply(req.request_id, message[:4096]))
        self.emit(identity, Finished(req.request_id, reason, len(req.prompt_ids), 0, 0.0))

    def _check(self, req: GenerateRequest) -> str | None:
        vocab, ctx = self.runner.vocab_size, self.runner.max_seq_len
        bad = next((t for t in req.prompt_ids if t >= vocab), None)
        if bad is not None:
            return f"token id {bad} out of range [0, {vocab})"
        n = len(req.prompt_ids)
        if n + req.max_new_tokens - 1 > ctx:
            return (f"prompt of {n} tokens + max_new_tokens {req.max_new_tokens} does not fit the KV cache "
                    f"(max_seq_len {ctx})")
        try:
            StopState.of(req, self.table)
        except StopRuleError as e:
            return str(e)
        if req.required_prefix:
            if self.table is None:
                return "required_prefix (token healing) needs the worker's token table, which this worker lacks"
            if not self._consistent(req.required_prefix.encode("utf-8")).any():
                return f"no token can start the required prefix {req.required_prefix!r}"
        return None

    def _fail(self, reason: str) -> None:
        if self.failed is not None:
            return
        print(f"codefill engine: not ready: {reason}", file=sys.stderr, flush=True)
        self.failed = reason
        for r in list(self.queue) + list(self.active.values()):
            self._finish(r, FinishReason.ERROR, f"model failed: {reason}")
        self._answer_reload(False, f"model failed: {reason}")
        self.lock.notify_all()

    def _answer_reload(self, ok: bool, message: str) -> None:
        if self._reload is not None:
            identity, msg = self._reload
            self._reload = None
            self.emit(identity, Reloaded(msg.request_id, ok, message[:4096], self.weights_version))
            self.lock.notify_all()

    # --- model calls (outside the lock) ----------------------------------------------------------------

    def _reload_now(self, pending: tuple[bytes, ReloadWeights]) -> bool:
        """Called under the lock with no request active; runs the reload outside it. Returns True (work done)."""
        model_dir = pending[1].model_dir
        self._call_started, self._call_what = self.clock(), f"reload of weights from {model_dir}"
        self._call_limit = self.config.reload_timeout_s
        self.lock.release()
        ok, broken = False, None
        try:
            self._check_table(model_dir)
            message, ok = self.runner.reload(model_dir), True
        except ValueError as e:  # refused before anything changed: the old weights serve on
            message = f"reload of {model_dir} refused, the old weights keep serving: {type(e).__name__}: {e}"
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            message = broken = f"reload of {model_dir} raised {type(e).__name__}: {e}"
        finally:
            self.lock.acquire()
            self._call_started, self._call_limit = None, self.config.step_timeout_s
        if self.failed or self.closed or self._reload is not pending:
            return False  # the watchdog gave up on it meanwhile (and answered it)
        if broken is not None:
            self._fail(broken)
            return False
        if ok:
            self.weights_version += 1
            for slot in self.cache.slots:  # their keys/values belong to the old weights
                slot.forget_from(0)
        print(f"codefill engine: {message}", file=sys.stderr, flush=True)
        self._answer_reload(ok, message)
        return True

    def _check_table(self, model_dir: str) -> None:
        """The stop-rule table (token -> bytes) must not change under queued requests: same tokenizer."""
        if self.table is None:
            return
        from .stops import StopRuleError, token_bytes_of_model_dir

        try:
            table = token_bytes_of_model_dir(model_dir)
        except StopRuleError as e:
            raise StopRuleError(f"cannot read the tokenizer of {model_dir}: {e}") from e
        if list(table) != list(self.table):
            differ = sum(a != b for a, b in zip(table, self.table)) + abs(len(table) - len(self.table))
            raise StopRuleError(f"the tokenizer of {model_dir} differs from the serving one ({len(table)} vs "
                                f"{len(self.table)} pieces, {differ} differ)")

    def _call(self, what: str, fn: Callable[[], np.ndarray], requests: list[Request]) -> np.ndarray | None:
        with self.lock:
            self._call_started, self._call_what = self.clock(), what
        try:
            return fn()
        except ValueError as e:  # the model refused these requests (e.g. GenerationError); others go on
            with self.lock:
                if self.failed is None:
                    for r in requests:
                        self._finish(r, FinishReason.ERROR, f"{what} failed: {type(e).__name__}: {e}")
            return None
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            with self.lock:
                self._fail(f"{what} raised {type(e).__name__}: {e}")
            return None
        finally:
            with self.lock:
                self._call_started = None
