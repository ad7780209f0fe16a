"""Token healing in the engine: the first tokens are constrained to spell a required prefix, chosen greedily
among the tokens consistent with it, and a healed continuation is never replayed as a plain greedy one."""

from __future__ import annotations

import numpy as np
import pytest

from codefill.inference_workers.engine import Engine, EngineConfig
from codefill.inference_workers.protocol import GenerateRequest, WireError, decode, encode
from codefill.inference_workers.stops import token_bytes_of_model_dir
from codefill.model.tokenizer import Tokenizer
from helpers import make_tiny_model_dir
from test_engine import Replies

PROMPT_TEXT = "def area(r):\n    "


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def runner(tiny_dir):
    from codefill.inference_workers.runner import Runner

    return Runner.from_model_dir(tiny_dir, max_seq_len=128, max_batch=2)


@pytest.fixture(scope="module")
def table(tiny_dir):
    return token_bytes_of_model_dir(tiny_dir)


@pytest.fixture(scope="module")
def prompt(tiny_dir):
    tok = Tokenizer(tiny_dir / "tokenizer.model")
    return [tok.bos_id] + tok.encode(PROMPT_TEXT)


def run(runner, table, req: GenerateRequest, engine=None):
    replies = Replies()
    engine = engine or Engine(runner, EngineConfig(), table, replies)
    engine.emit = replies
    engine.submit(b"c", req)
    engine.run_until_idle()
    return engine, replies


@pytest.mark.parametrize("required", ["r", "ret", "return", "retu", "é", "x_y"])
def test_generated_text_starts_with_the_required_prefix(runner, table, prompt, required):
    _, replies = run(runner, table, GenerateRequest("h", prompt, 12, required_prefix=required))
    text = b"".join(table[t] for t in replies.tokens("h"))
    assert text.startswith(required.encode()), (required, text)


def test_first_token_is_the_greedy_choice_among_consistent_tokens(runner, table, prompt):
    logits = runner.prefill(prompt, slot=0, start_pos=0)
    heal = b"ret"
    consistent = np.array([(p.startswith(heal) or heal.startswith(p)) and len(p) > 0 for p in table])
    expected = int(np.argmax(np.where(consistent, logits, -np.inf)))
    _, replies = run(runner, table, GenerateRequest("h", prompt, 1, required_prefix="ret"))
    assert replies.tokens("h") == [expected]
    # The log-prob is the model's own (unconstrained softmax), so confidence stays comparable.
    z = logits - logits.max()
    assert replies.logprobs("h")[0] == pytest.approx(float(z[expected] - np.log(np.exp(z).sum())), abs=1e-5)


def test_a_healed_continuation_is_not_replayed_to_a_plain_greedy_request(runner, table, prompt):
    _, plain = run(runner, table, GenerateRequest("p", prompt, 6))
    engine, healed = run(runner, table, GenerateRequest("h", prompt, 6, required_prefix="zz"))
    assert healed.tokens("h") != plain.tokens("p")
    _, again = run(runner, table, GenerateRequest("p2", prompt, 6), engine=engine)
    assert again.tokens("p2") == plain.tokens("p")
    assert again.finished("p2").n_replayed == 0


def test_healing_needs_the_token_table(runner, prompt):
    _, replies = run(runner, None, GenerateRequest("h", prompt, 4, required_prefix="ret"))
    assert "token table" in replies.error("h")


def test_required_prefix_on_the_wire():
    req = GenerateRequest("h", [1, 2], 4, required_prefix="reti")
    assert decode(encode(req), GenerateRequest).required_prefix == "reti"
    with pytest.raises(WireError, match="required_prefix"):
        GenerateRequest("h", [1, 2], 4, required_prefix="x" * 300)
