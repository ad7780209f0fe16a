"""Prompt-lookup speculation (engine._draft / _speculate, runner.verify): a lone greedy request drafts ids from
its own context and keeps what plain greedy decoding makes. Checked on the bundled model and real code: the
tokens and log-probs equal those with speculation off, token for token, and drafts are really accepted."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from codefill.bundled import bundled_model_dir
from codefill.inference_workers.engine import Engine, EngineConfig
from codefill.inference_workers.protocol import Finished, FinishReason, GenerateRequest, Token
from codefill.inference_workers.runner import Runner
from codefill.inference_workers.stops import token_bytes_of_model_dir
from codefill.model.tokenizer import Tokenizer

MAX_SEQ_LEN = 512


@pytest.fixture(scope="module")
def runner():
    return Runner.from_model_dir(bundled_model_dir(), max_seq_len=MAX_SEQ_LEN, max_batch=2)


@pytest.fixture(scope="module")
def prompts():
    """Cuts of real standard-library code: each a prefix ending at the start of a line."""
    tok = Tokenizer(bundled_model_dir() / "tokenizer.model")
    out = []
    for name in ("argparse.py", "textwrap.py", "dataclasses.py", "json/encoder.py", "csv.py"):
        text = (Path(sysconfig.get_paths()["stdlib"]) / name).read_text()
        for cut in (0.3, 0.6):
            end = text.index("\n", int(len(text) * cut)) + 1
            out.append(tok.encode(text[:end], bos=True)[-300:])
    return out


def run(runner, prompt, n, speculate):
    log = []
    engine = Engine(runner, EngineConfig(speculate=speculate), token_bytes_of_model_dir(bundled_model_dir()),
                    lambda identity, msg: log.append(msg))
    engine.submit(b"c", GenerateRequest("r", prompt, n))
    engine.run_until_idle()
    tokens = [(m.token_id, m.logprob) for m in log if isinstance(m, Token)]
    (done,) = [m for m in log if isinstance(m, Finished)]
    return tokens, done, engine


def test_speculation_keeps_greedy_output_token_for_token(runner, prompts):
    accepted = drafted = 0
    for prompt in prompts:
        plain, done_plain, _ = run(runner, prompt, 40, speculate=0)
        fast, done_fast, engine = run(runner, prompt, 40, speculate=4)
        assert [t for t, _ in fast] == [t for t, _ in plain]
        np.testing.assert_allclose([p for _, p in fast], [p for _, p in plain], atol=1e-4)
        assert done_fast.finish_reason == done_plain.finish_reason == FinishReason.LENGTH
        accepted, drafted = accepted + engine.accepted, drafted + engine.drafted
    assert drafted > 0 and accepted > 0, (accepted, drafted)  # real code repeats: some drafts are kept
    assert accepted <= drafted


def test_a_stop_inside_an_accepted_draft_ends_the_request_there(runner, prompts):
    prompt = prompts[0]
    plain, _, _ = run(runner, prompt, 40, speculate=0)
    stop = plain[5][0]  # the 6th greedy token as a stop id
    cut = [t for t, _ in plain].index(stop) + 1
    for speculate in (0, 4):
        log = []
        engine = Engine(runner, EngineConfig(speculate=speculate), token_bytes_of_model_dir(bundled_model_dir()),
                        lambda identity, msg: log.append(msg))
        engine.submit(b"c", GenerateRequest("r", prompt, 40, stop_ids=[stop]))
        engine.run_until_idle()
        assert [m.token_id for m in log if isinstance(m, Token)] == [t for t, _ in plain[:cut]]


def test_verify_returns_every_positions_logits(runner):
    runner.prefill([1, 5, 9], 1, 0)
    every = runner.verify([33, 120, 7], 1, 3)
    for i, k in enumerate((4, 5, 6)):
        np.testing.assert_allclose(every[i], runner.prefill([1, 5, 9, 33, 120, 7][:k], 0, 0), rtol=1e-4, atol=1e-4)


def test_the_gate_speculates_only_while_a_verify_step_pays():
    from codefill.inference_workers.speculation_gate import PROBE_EVERY, SpeculationGate

    gate = SpeculationGate()
    assert gate.should_speculate()  # nothing measured yet: try it
    gate.decoded(0.002)
    gate.verified(0.004, 1)  # a verify made one token at twice a decode step's cost
    for _ in range(3):
        gate.verified(0.004, 1)
    decisions = [gate.should_speculate() for _ in range(2 * PROBE_EVERY)]
    assert decisions.count(True) == 2 and decisions[PROBE_EVERY - 1] and decisions[-1]  # only the probes
    for _ in range(20):
        gate.verified(0.004, 3)  # the text turned repetitive: three tokens per verify step
    assert all(gate.should_speculate() for _ in range(PROBE_EVERY))
