"""The serving engine on a real tiny model (a Runner of world size 1), stepped in the test's thread.

Every reuse path must give what a cold run gives: prefix reuse and rollback the same logits as a cold
prefill; in-flight extension and batched decode the same tokens as a fresh solo request. Scheduling (cancel,
deadline, overload, takeover) is checked on the replies the engine emits; a fake runner that hangs or raises
stands in for a dead model.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from codefill.inference_workers.engine import Engine, EngineConfig
from codefill.inference_workers.protocol import ErrorReply, Finished, FinishReason, GenerateRequest, Token
from codefill.inference_workers.stops import StopRuleError, StopState, token_bytes_of_model_dir
from helpers import make_tiny_model_dir

MAX_SEQ_LEN, MAX_BATCH = 256, 4
PROMPTS = [
    [1, 17, 42, 99, 230, 7, 311, 64],
    [1, 5, 6, 7],
    [1, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310],
    [1, 88, 77, 66, 55, 44],
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def runner(tiny_dir):
    from codefill.inference_workers.runner import Runner

    return Runner.from_model_dir(tiny_dir, max_seq_len=MAX_SEQ_LEN, max_batch=MAX_BATCH)


@pytest.fixture(scope="module")
def table(tiny_dir):
    return token_bytes_of_model_dir(tiny_dir)


class Replies:
    """What the engine emitted, per request id."""

    def __init__(self):
        self.log: list[tuple[bytes, object]] = []

    def __call__(self, identity, msg):
        self.log.append((identity, msg))

    def tokens(self, rid: str) -> list[int]:
        return [m.token_id for _, m in self.log if isinstance(m, Token) and m.request_id == rid]

    def logprobs(self, rid: str) -> list[float]:
        return [m.logprob for _, m in self.log if isinstance(m, Token) and m.request_id == rid]

    def finished(self, rid: str) -> Finished:
        done = [m for _, m in self.log if isinstance(m, Finished) and m.request_id == rid]
        assert len(done) == 1, f"{rid}: {len(done)} Finished in {self.log}"
        return done[0]

    def error(self, rid: str) -> str:
        return next(m.message for _, m in self.log if isinstance(m, ErrorReply) and m.request_id == rid)


def make_engine(runner, table=None, **config):
    replies = Replies()
    return Engine(runner, EngineConfig(**config), table, replies), replies


def solo(runner, prompt, n, **config):
    """Greedy tokens and log-probs of one request alone on a fresh engine (cold: nothing cached)."""
    engine, replies = make_engine(runner, **config)
    engine.submit(b"c", GenerateRequest("solo", prompt, n))
    engine.run_until_idle()
    assert replies.finished("solo").n_reused == 0
    return replies.tokens("solo"), replies.logprobs("solo")


def test_prefix_reuse_and_rollback_logits_equal_cold_prefill(runner):
    a = PROMPTS[0] + [5, 6, 7, 8, 9]
    b = PROMPTS[0] + [100, 101]  # shares 8 ids with a, then diverges: roll slot 0 back to 8
    runner.prefill(a, 0, 0)
    reused = runner.prefill(b[8:], 0, 8)
    cold = runner.prefill(b, 1, 0)
    np.testing.assert_allclose(reused, cold, rtol=1e-5, atol=1e-5)
    # and a decode step on the rolled-back slot continues exactly like one on the cold slot
    tokens = [7, 7, 0, 0]
    positions = [len(b), len(b), runner.idle_position, runner.idle_position]
    step = runner.decode_step(tokens, positions)
    np.testing.assert_allclose(step[0], step[1], rtol=1e-5, atol=1e-5)


def test_engine_prefix_reuse_gives_cold_tokens(runner):
    engine, replies = make_engine(runner)
    first = PROMPTS[0] + [5, 6, 7, 8, 9]
    engine.submit(b"c", GenerateRequest("a", first, 6))
    engine.run_until_idle()
    second = PROMPTS[0] + [100, 101, 102]  # rolls back to the 8 shared ids
    engine.submit(b"c", GenerateRequest("b", second, 10))
    engine.run_until_idle()
    assert replies.finished("b").n_reused == len(PROMPTS[0])
    cold_tokens, cold_lp = solo(runner, second, 10)
    assert replies.tokens("b") == cold_tokens
    assert replies.logprobs("b") == pytest.approx(cold_lp, abs=1e-4)


def test_one_id_keystroke_rides_the_decode_step_and_gives_cold_tokens(runner):
    engine, replies = make_engine(runner)
    engine.submit(b"other", GenerateRequest("busy", PROMPTS[1], 30))  # something else decoding meanwhile
    engine.submit(b"c", GenerateRequest("a", PROMPTS[0], 4))
    engine.run_until_idle()
    typed = PROMPTS[0] + [123]  # not what the model suggested: no replay, one id to run
    engine.submit(b"c", GenerateRequest("b", typed, 8))
    engine.submit(b"other", GenerateRequest("busy2", PROMPTS[1], 30))
    engine.run_until_idle()
    assert replies.finished("b").n_reused == len(PROMPTS[0])
    cold_tokens, cold_lp = solo(runner, typed, 8)
    assert replies.tokens("b") == cold_tokens
    assert replies.logprobs("b") == pytest.approx(cold_lp, abs=1e-4)
    # and its greedy decode is cached for the next keystroke
    engine.submit(b"c", GenerateRequest("c", typed + cold_tokens[:2], 6))
    engine.run_until_idle()
    assert replies.finished("c").n_replayed == 6 and replies.tokens("c") == cold_tokens[2:8]


def test_no_prefix_reuse_switch_prefills_everything(runner):
    engine, replies = make_engine(runner, prefix_reuse=False, inflight_extension=False)
    for rid in ("a", "b"):
        engine.submit(b"c", GenerateRequest(rid, PROMPTS[0], 4))
        engine.run_until_idle()
    assert replies.finished("b").n_reused == 0 and replies.tokens("a") == replies.tokens("b")


def test_inflight_extension_after_finish_replays_the_cached_decode(runner):
    prompt = PROMPTS[0]
    full, full_lp = solo(runner, prompt, 12)
    engine, replies = make_engine(runner)
    engine.submit(b"c", GenerateRequest("a", prompt, 12))
    engine.run_until_idle()
    # the user typed the first 4 suggested tokens: the next 8 are known without running the model
    engine.submit(b"c", GenerateRequest("b", prompt + full[:4], 10))
    engine.run_until_idle()
    fin = replies.finished("b")
    assert fin.n_replayed == 8 and fin.n_generated == 10
    fresh, fresh_lp = solo(runner, prompt + full[:4], 10)
    assert replies.tokens("b") == fresh and fresh[:8] == full[4:]
    assert replies.logprobs("b") == pytest.approx(fresh_lp, abs=1e-4)


def test_inflight_extension_takes_over_a_running_request(runner):
    prompt = PROMPTS[2]
    full, _ = solo(runner, prompt, 40)
    engine, replies = make_engine(runner)
    engine.submit(b"lsp", GenerateRequest("k1", prompt, 40))
    for _ in range(6):
        engine.step()
    assert len(replies.tokens("k1")) == 7  # the first step prefills and decodes
    # next keystroke: the prompt grows by the first 3 tokens the model suggested
    engine.submit(b"lsp", GenerateRequest("k2", prompt + full[:3], 20))
    engine.step()
    assert replies.finished("k1").finish_reason == FinishReason.SUPERSEDED
    engine.run_until_idle()
    fin = replies.finished("k2")
    assert fin.n_replayed == 4 and fin.finish_reason == FinishReason.LENGTH  # full[3:7] came at once
    assert replies.tokens("k2") == solo(runner, prompt + full[:3], 20)[0] == full[3:23]


def test_inflight_extension_rolls_back_on_divergence(runner):
    prompt = PROMPTS[2]
    full, _ = solo(runner, prompt, 30)
    typed = [full[0], (full[1] + 1) % 500, 42]  # agrees with the suggestion for one token, then diverges
    engine, replies = make_engine(runner)
    engine.submit(b"lsp", GenerateRequest("k1", prompt, 30))
    for _ in range(8):
        engine.step()
    engine.submit(b"lsp", GenerateRequest("k2", prompt + typed, 12))
    engine.run_until_idle()
    assert replies.finished("k1").finish_reason == FinishReason.SUPERSEDED
    fin = replies.finished("k2")
    assert fin.n_reused == len(prompt) + 1 and fin.n_replayed == 0
    assert replies.tokens("k2") == solo(runner, prompt + typed, 12)[0]


def test_other_clients_are_never_superseded(runner):
    engine, replies = make_engine(runner)
    engine.submit(b"one", GenerateRequest("a", PROMPTS[1], 10))
    engine.step()
    engine.submit(b"two", GenerateRequest("b", PROMPTS[1] + replies.tokens("a"), 4))
    engine.run_until_idle()
    assert replies.finished("a").finish_reason == FinishReason.LENGTH
    assert replies.finished("b").finish_reason == FinishReason.LENGTH


def test_batched_decode_gives_each_request_its_solo_tokens(runner):
    expected = [solo(runner, p, 12 + i) for i, p in enumerate(PROMPTS)]
    engine, replies = make_engine(runner, prefill_chunk=5)  # prompts longer than 5 prefill over several steps
    for i, p in enumerate(PROMPTS):
        engine.submit(b"c", GenerateRequest(f"r{i}", p, 12 + i))
        engine.step()  # they join one by one while the earlier ones decode
    engine.run_until_idle()
    for i, (tokens, logprobs) in enumerate(expected):
        assert replies.tokens(f"r{i}") == tokens
        assert replies.logprobs(f"r{i}") == pytest.approx(logprobs, abs=1e-4)
        assert replies.finished(f"r{i}").finish_reason == FinishReason.LENGTH


def test_more_requests_than_slots_queue_and_all_finish(runner):
    engine, replies = make_engine(runner)
    prompts = PROMPTS + [[1, 2, 3], [1, 9, 9, 9]]
    for i, p in enumerate(prompts):
        engine.submit(b"c", GenerateRequest(f"r{i}", p, 5))
    assert engine.health(1).n_queued == len(prompts)
    engine.run_until_idle()
    for i, p in enumerate(prompts):
        assert replies.tokens(f"r{i}") == solo(runner, p, 5)[0]


def test_sampled_request_matches_generator(runner, tiny_dir):
    from codefill.inference_workers.runner import Runner
    from codefill.model.sampling import SamplingConfig

    gen = Runner.from_model_dir(tiny_dir, max_seq_len=MAX_SEQ_LEN, max_batch=1)
    cfg = SamplingConfig(temperature=0.8, top_k=50, top_p=0.9, seed=3)
    expected = [t for t, _ in gen.generate(PROMPTS[0], 10, cfg)]
    engine, replies = make_engine(runner)
    engine.submit(b"c", GenerateRequest("s", PROMPTS[0], 10, 0.8, 50, 0.9, 3))
    engine.submit(b"c", GenerateRequest("g", PROMPTS[1], 10))  # a greedy neighbour in the batch
    engine.run_until_idle()
    assert replies.tokens("s") == expected


def test_cancel_mid_generation_frees_the_slot(runner):
    engine, replies = make_engine(runner)
    engine.submit(b"c", GenerateRequest("a", PROMPTS[0], 100))
    for _ in range(3):
        engine.step()
    engine.cancel(b"c", "a")
    engine.step()
    fin = replies.finished("a")
    # 3 steps: prefill + decode, then 2 decodes; the cancel lands before the 4th step runs the model
    assert fin.finish_reason == FinishReason.CANCELLED and fin.n_generated == 4 == len(replies.tokens("a"))
    assert engine.health(2).n_active == 0
    engine.cancel(b"c", "a")  # a late cancel is ignored
    engine.cancel(b"c", "never-sent")


def test_cancel_of_queued_request(runner):
    engine, replies = make_engine(runner)
    engine.submit(b"c", GenerateRequest("q", PROMPTS[0], 4))
    engine.cancel(b"c", "q")
    assert replies.finished("q").finish_reason == FinishReason.CANCELLED
    assert engine.idle()


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_deadline_drops_a_queued_request_and_stops_a_running_one(runner):
    clock = Clock()
    replies = Replies()
    engine = Engine(runner, EngineConfig(), None, replies, clock=clock)
    engine.submit(b"c", GenerateRequest("late", PROMPTS[0], 4, deadline_ms=50))
    engine.submit(b"c", GenerateRequest("slow", PROMPTS[1], 100, deadline_ms=500))
    engine.submit(b"c", GenerateRequest("fine", PROMPTS[2], 3))
    clock.now += 0.1  # "late" waited 100 ms in the queue
    engine.step()
    late = replies.finished("late")
    assert late.finish_reason == FinishReason.DEADLINE and late.n_generated == 0 and replies.tokens("late") == []
    engine.step()
    clock.now += 0.5
    engine.run_until_idle()
    slow = replies.finished("slow")
    assert slow.finish_reason == FinishReason.DEADLINE and 1 <= slow.n_generated < 100
    assert replies.finished("fine").finish_reason == FinishReason.LENGTH


def test_full_queue_answers_overloaded_at_once(runner):
    engine, replies = make_engine(runner, max_queue=2)
    for rid in ("a", "b", "c"):
        engine.submit(b"c", GenerateRequest(rid, PROMPTS[0], 2))
    fin = replies.finished("c")
    assert fin.finish_reason == FinishReason.OVERLOADED
    assert "overloaded: 2 requests queued (max_queue 2)" in replies.error("c")
    engine.run_until_idle()
    assert replies.finished("a").finish_reason == replies.finished("b").finish_reason == FinishReason.LENGTH


def test_requests_the_model_cannot_run_are_refused_with_values(runner):
    engine, replies = make_engine(runner)
    engine.submit(b"c", GenerateRequest("big", [1] * 250, 10))
    engine.submit(b"c", GenerateRequest("vocab", [1, 100000], 3))
    engine.submit(b"c", GenerateRequest("text", [1, 2], 3, stop_at_eol=True))  # no token table
    engine.submit(b"c", GenerateRequest("ok", [1, 2], 3))
    engine.submit(b"c", GenerateRequest("ok", [1, 2], 3))  # same id again on this connection
    assert "prompt of 250 tokens + max_new_tokens 10 does not fit the KV cache (max_seq_len 256)" in replies.error("big")
    assert "token id 100000 out of range [0, 512)" in replies.error("vocab")
    assert "has text stop rules" in replies.error("text")
    assert "request id 'ok' is already in flight" in replies.error("ok")
    engine.run_until_idle()
    for rid in ("big", "vocab", "text"):
        assert replies.finished(rid).finish_reason == FinishReason.ERROR
    assert [m.finish_reason for _, m in replies.log if isinstance(m, Finished) and m.request_id == "ok"] == [
        FinishReason.ERROR, FinishReason.LENGTH]


def test_draining_refuses_new_requests(runner):
    engine, replies = make_engine(runner)
    engine.submit(b"c", GenerateRequest("in-flight", PROMPTS[0], 5))
    engine.drain()
    engine.submit(b"c", GenerateRequest("new", PROMPTS[0], 5))
    assert replies.finished("new").finish_reason == FinishReason.OVERLOADED
    assert "draining" in replies.error("new")
    assert engine.health(3).ready is False and engine.health(3).reason == "draining"
    engine.run_until_idle()
    assert replies.finished("in-flight").finish_reason == FinishReason.LENGTH and engine.idle()


# --- stop rules on text ------------------------------------------------------------------------------------


def test_token_table_matches_the_tokenizers_decode(tiny_dir, table):
    from codefill.model.tokenizer import Tokenizer

    tok = Tokenizer(tiny_dir / "tokenizer.model")
    ids = tok.encode_infilling("def f(x):\n    return x  # é ☺\n\tpass") + [tok.eot_id]
    assert b"".join(table[i] for i in ids) == tok.decode_infilling(ids).encode("utf-8")


def _state(table, **rules):
    defaults = dict(max_new_tokens=100, stop_ids=[9])
    defaults.update(rules)
    return StopState.of(GenerateRequest("r", [1], **defaults), table)


def _feed(state, ids):
    for n, i in enumerate(ids, 1):
        reason, keep = state.add(i)
        if reason is not None:
            return reason, keep, n
    return None, state.text_bytes, len(ids)


FAKE_TABLE = [b"", b"a", b"b", b"\n", b"    ", b"  ", b"x = 1", b"\n\n", b"END", b""]


@pytest.mark.parametrize("ids, rules, expected", [
    ([1, 2, 9, 1], {}, (FinishReason.STOP, 2, 3)),
    ([1, 2, 1], {"max_new_tokens": 3}, (FinishReason.LENGTH, 3, 3)),
    ([1, 8, 1], {"stop_strings": ["END"]}, (FinishReason.STOP_STRING, 1, 2)),
    ([1, 2, 7, 1], {"stop_strings": ["b\n"]}, (FinishReason.STOP_STRING, 1, 3)),  # a match across tokens
    ([3, 4, 6, 3, 1], {"stop_at_eol": True}, (FinishReason.END_OF_LINE, 10, 4)),  # a leading newline is kept
    ([1, 3, 4, 6, 3, 5, 1], {"dedent_column": 4}, (FinishReason.DEDENT, 11, 7)),
    ([1, 3, 4, 3, 4, 6], {"dedent_column": 4}, (None, 16, 6)),  # a blank line does not end the block
    ([1, 3, 5], {"dedent_column": 4}, (None, 4, 3)),  # "  " so far: undecided until something non-blank
    ([1, 3, 4, 6, 3, 4, 1], {"dedent_column": 4}, (None, 17, 7)),
    ([1, 7, 6], {"stop_at_eol": True, "stop_strings": ["\n\n"]}, (FinishReason.STOP_STRING, 1, 2)),
])
def test_stop_rules(ids, rules, expected):
    assert _feed(_state(FAKE_TABLE, **rules), ids) == expected


def test_text_stop_rules_through_the_engine(runner, table):
    engine, replies = make_engine(runner, table)
    tokens, _ = solo(runner, PROMPTS[0], 30)
    text = b"".join(table[t] for t in tokens)
    stop = text[5:8].decode("utf-8", "replace")
    engine.submit(b"c", GenerateRequest("s", PROMPTS[0], 30, stop_strings=[stop]))
    engine.run_until_idle()
    fin = replies.finished("s")
    got = b"".join(table[t] for t in replies.tokens("s"))
    assert fin.finish_reason == FinishReason.STOP_STRING and fin.text_bytes == got.find(stop.encode())
    assert got.find(stop.encode()) + len(stop.encode()) <= len(got)  # the completing token was sent
    with pytest.raises(StopRuleError, match="no token table"):
        StopState.of(GenerateRequest("r", [1], 3, dedent_column=4), None)


# --- faults ------------------------------------------------------------------------------------------------


class FakeRunner:
    """A stand-in model of 16 ids: logits favour the id after the last one fed. `hang` blocks decode_step."""

    max_batch, max_seq_len, vocab_size = 2, 64, 16
    idle_position = 64

    def __init__(self, hang=False, raises=None):
        self.hang, self.raises = hang, raises
        self.release = threading.Event()
        self.entered = threading.Event()

    def _logits(self, last):
        out = np.zeros(self.vocab_size, np.float32)
        out[(last + 1) % self.vocab_size] = 5.0
        return out

    def prefill(self, ids, slot, start_pos):
        return self._logits(ids[-1])

    def decode_step(self, tokens, positions):
        self.entered.set()
        if self.raises is not None:
            raise self.raises
        if self.hang:
            self.release.wait(60)
        return np.stack([self._logits(t) for t in tokens])

    def close(self):
        pass


def test_hung_model_errors_every_request_within_the_watchdog_bound():
    fake = FakeRunner(hang=True)
    engine, replies = make_engine(fake, step_timeout_s=0.3)
    engine.submit(b"c", GenerateRequest("running", [1, 2], 10))
    engine.submit(b"c", GenerateRequest("also", [1, 3], 10))
    engine.submit(b"c", GenerateRequest("queued", [1, 4], 10))
    engine.start()
    try:
        assert fake.entered.wait(30)
        bound = time.monotonic() + 30
        while engine.health(1).ready:
            assert time.monotonic() < bound, "the watchdog never fired"
            engine.check_watchdog()
            time.sleep(0.05)
        for rid in ("running", "also", "queued"):
            assert replies.finished(rid).finish_reason == FinishReason.ERROR
            assert "model step hung: decode step of 2 rows has run for" in replies.error(rid)
        health = engine.health(2)
        assert not health.ready and "step_timeout_s 0.3" in health.reason
        engine.submit(b"c", GenerateRequest("after", [1], 2))
        assert replies.finished("after").finish_reason == FinishReason.ERROR
        assert replies.error("after").startswith("model not ready: model step hung")
    finally:
        fake.release.set()
        engine.close()
    # the step that finally returned changes nothing: each request got exactly one Finished
    for rid in ("running", "also", "queued", "after"):
        replies.finished(rid)


def test_runner_exception_fails_the_engine_but_value_error_only_the_request():
    engine, replies = make_engine(FakeRunner(raises=ValueError("bad ids")))
    engine.submit(b"c", GenerateRequest("a", [1, 2], 5))
    engine.run_until_idle()
    assert "decode step of 1 rows failed: ValueError: bad ids" in replies.error("a")
    assert engine.health(1).ready
    engine, replies = make_engine(FakeRunner(raises=RuntimeError("rank 1 is gone")))
    engine.submit(b"c", GenerateRequest("a", [1, 2], 5))
    engine.run_until_idle()
    assert "model failed: decode step of 1 rows raised RuntimeError: rank 1 is gone" in replies.error("a")
    assert not engine.health(1).ready


def test_min_new_tokens_holds_back_stop_ids_in_engine_replay_and_runner(runner):
    from codefill.inference_workers.protocol import WireError
    from codefill.model.sampling import log_softmax

    prompt = PROMPTS[0]
    full, _ = solo(runner, prompt, 6)
    stop = [full[0]]  # the model's own first choice, taken as the stop id: it wants to end at once
    logits = runner.prefill(prompt, 0, 0).copy()
    logits[stop] = -np.inf
    second = int(np.argmax(logits))  # what it must write instead
    engine, replies = make_engine(runner)
    engine.submit(b"c", GenerateRequest("free", prompt, 6, stop_ids=stop))
    engine.run_until_idle()
    assert replies.tokens("free") == stop and replies.finished("free").finish_reason == FinishReason.STOP
    # same prompt, same slot: the cached continuation starts with the stop id, so it must not be replayed
    engine.submit(b"c", GenerateRequest("held", prompt, 6, stop_ids=stop, min_new_tokens=1))
    engine.run_until_idle()
    held = replies.tokens("held")
    assert replies.finished("held").n_replayed == 0 and held[0] == second != full[0]
    unmodified = log_softmax(runner.prefill(prompt, 1, 0))[second]
    assert replies.logprobs("held")[0] == pytest.approx(float(unmodified), abs=1e-4)
    # the in-process runner does the same
    assert [t for t, _ in runner.generate(prompt, 6, stop_ids=frozenset(stop), min_new_tokens=1)] == held
    # the held-back id is not the model's argmax: typing it must not replay the rest as the greedy decode
    engine.submit(b"c", GenerateRequest("typed", prompt + [second], 4))
    engine.run_until_idle()
    assert replies.finished("typed").n_replayed == 0
    assert replies.tokens("typed") == solo(runner, prompt + [second], 4)[0]
    with pytest.raises(WireError, match="min_new_tokens"):
        GenerateRequest("bad", prompt, 4, min_new_tokens=5)
