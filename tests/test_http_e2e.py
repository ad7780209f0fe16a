"""`codefill http` on a real worker (a tiny model), with real clients: the `openai` package against
/v1/completions (plain, streaming, n > 1, with and without a suffix, a stop string), llama.vim's body against
/infill, and the same bodies sent to a real `llama-server` answering with the same field names and types.

The text must equal the in-process path for the same cursor: lsp/prompt.py's prompt at the server's budget,
the Runner's greedy tokens, decoded to the raw middle (the HTTP APIs return it unfitted). Cursors end in a
space or a newline, so token healing leaves the prompt as it is.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import make_tiny_model_dir
from http_helpers import post, post_events, running_http

MAX_SEQ_LEN = 512  # the worker's and the reference's context: equal, so the graphs compute the same sums
PREFIX = "def fibonacci(n: int) -> int:\n    if n < 2:\n        return "
SUFFIX = "\n    a, b = 0, 1\n    return b\n"
LLAMA_VIM = {  # llama.vim's llama#fim body (autoload/llama.vim), with a shorter n_predict and no n_indent
    "id_slot": 0, "input_prefix": "def fibonacci(n: int) -> int:\n", "input_suffix": SUFFIX,
    "input_extra": [{"text": "def lucas(n):\n    return 2 if n == 0 else 1\n", "filename": "lucas.py"}],
    "prompt": "    if n < 2:\n        return ", "n_predict": 24, "stop": [], "n_indent": 0, "top_k": 40,
    "top_p": 0.90, "samplers": ["top_k", "top_p", "infill"], "stream": False, "cache_prompt": True,
    "t_max_prompt_ms": 500, "t_max_predict_ms": 1000,
    "response_fields": ["content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms",
                        "timings/prompt_per_second", "timings/predicted_n", "timings/predicted_ms",
                        "timings/predicted_per_token_ms", "timings/predicted_per_second", "truncated",
                        "tokens_cached"],
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def expected(tiny_dir):
    """(raw middle, ended by <EOT>) of the in-process path for a cursor, `max_new` tokens at most."""
    from codefill.inference_workers.runner import Runner
    from codefill.lsp.completion import Completer
    from codefill.lsp.prompt import Chunk
    from codefill.lsp.settings import Settings
    from codefill.model.checkpoint import TOKENIZER_NAME
    from codefill.model.fim import cut_middle
    from codefill.model.sampling import SamplingConfig
    from codefill.model.tokenizer import Tokenizer

    tok = Tokenizer(tiny_dir / TOKENIZER_NAME)
    gen = Runner.from_model_dir(tiny_dir, max_seq_len=MAX_SEQ_LEN, max_batch=1)
    completer = Completer(tok)

    def middle(prefix: str, suffix: str, max_new: int, chunks: list[Chunk] = ()) -> tuple[str, bool]:
        plan = completer.plan(MAX_SEQ_LEN, Settings(), prefix, suffix, path=None, language_id=None, chunks=chunks,
                              max_new=max_new)
        assert plan.heal == ""
        out = gen.generate(plan.prompt.ids, max_new, SamplingConfig(), stop_ids=frozenset(completer.stop_ids))
        ids, ended = cut_middle(tok, [t for t, _ in out])
        return tok.decode_infilling(ids), ended

    return middle


@pytest.fixture(scope="module")
def url(tiny_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("http") / "http.log"
    with running_http(tiny_dir, log, "--worker-max-seq-len", str(MAX_SEQ_LEN), "--model-name", "codellama-tiny") as u:
        yield u


@pytest.fixture(scope="module")
def openai_client(url):
    openai = pytest.importorskip("openai", reason="the openai package comes with the test extra")
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_openai_completion_equals_the_in_process_middle(openai_client, expected):
    text, ended = expected(PREFIX, SUFFIX, 24)
    assert text, "the tiny model should produce a middle for this cursor"
    done = openai_client.completions.create(model="codellama-tiny", prompt=PREFIX, suffix=SUFFIX, max_tokens=24,
                                            temperature=0)
    assert [c.text for c in done.choices] == [text]
    assert done.choices[0].finish_reason == ("stop" if ended else "length")
    assert done.model == "codellama-tiny" and done.object == "text_completion"
    assert done.usage.completion_tokens > 0 and done.usage.prompt_tokens > 0


def test_openai_stream_gives_the_same_text(openai_client, expected):
    text, ended = expected(PREFIX, SUFFIX, 24)
    chunks = list(openai_client.completions.create(model="codellama-tiny", prompt=PREFIX, suffix=SUFFIX,
                                                   max_tokens=24, temperature=0, stream=True))
    assert len(chunks) > 1
    assert "".join(c.choices[0].text for c in chunks) == text
    assert [c.choices[0].finish_reason for c in chunks][-1] == ("stop" if ended else "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_openai_n_gives_n_choices(openai_client, expected):
    text, _ = expected(PREFIX, SUFFIX, 24)
    done = openai_client.completions.create(model="codellama-tiny", prompt=PREFIX, suffix=SUFFIX, max_tokens=24,
                                            temperature=0, n=2)
    assert sorted(c.index for c in done.choices) == [0, 1]
    assert [c.text for c in done.choices] == [text, text]  # greedy: the same middle twice
    streamed = list(openai_client.completions.create(model="codellama-tiny", prompt=PREFIX, suffix=SUFFIX,
                                                     max_tokens=24, temperature=0, n=2, stream=True))
    for i in (0, 1):
        assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == i) == text


def test_openai_without_suffix_completes_the_prompt(openai_client, expected):
    text, _ = expected(PREFIX, "", 16)
    done = openai_client.completions.create(model="codellama-tiny", prompt=PREFIX, max_tokens=16, temperature=0)
    assert done.choices[0].text == text


def test_openai_stop_string_cuts_before_it(openai_client, expected):
    text, _ = expected(PREFIX, SUFFIX, 24)
    # two letters from the middle's second half (the untrained model also writes invalid UTF-8, shown as U+FFFD)
    at = next((i for i in range(len(text) // 2, len(text) - 1) if text[i:i + 2].isalnum()), None)
    assert at is not None, f"pick another cursor: the middle {text!r} has no two letters in its second half"
    stop = text[at:at + 2]
    for stream in (False, True):
        done = openai_client.completions.create(model="codellama-tiny", prompt=PREFIX, suffix=SUFFIX, max_tokens=24,
                                                temperature=0, stop=[stop], stream=stream)
        got = "".join(c.choices[0].text for c in done) if stream else done.choices[0].text
        assert got == text[:text.index(stop)]


def test_openai_errors_reach_the_client_as_bad_request(openai_client):
    import openai

    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        openai_client.completions.create(model="codellama-tiny", prompt=PREFIX, max_tokens=-3)


def test_llama_vim_body_equals_the_in_process_middle(url, expected):
    from codefill.lsp.prompt import Chunk

    chunk = LLAMA_VIM["input_extra"][0]
    text, _ = expected(LLAMA_VIM["input_prefix"] + LLAMA_VIM["prompt"], SUFFIX, 24,
                       [Chunk(chunk["filename"], chunk["text"])])
    status, res = post(url + "/infill", LLAMA_VIM)
    assert status == 200, res
    assert res["content"] == text
    assert set(res) == set(LLAMA_VIM["response_fields"])
    events = post_events(url + "/infill", {**LLAMA_VIM, "stream": True, "response_fields": None})
    assert "".join(e["content"] for e in events) == text


# --- against llama-server -----------------------------------------------------------------------------------


def _llama_server():
    """The llama.cpp build the benchmarks made (`codefill bench lsp`), found, never built here: a build takes
    ten minutes. Looked for in this session's cache and in the default one, where the benchmarks leave it."""
    from codefill import llamacpp

    for cache in (llamacpp.cache_root(), Path.home() / ".cache" / "codefill"):
        if (found := llamacpp.find(cache)) is not None:
            return found
    pytest.skip("llama-server is not built here (`codefill bench lsp` builds it into ~/.cache/codefill); "
                "the field comparison with llama.cpp is skipped")


def _shape(value):
    """A JSON value's field names and types, recursively for objects ("number" for int and float alike:
    llama.cpp writes a whole double as 12.0 or 12 depending on the field)."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", type(None): "null"}[type(value)]


@pytest.fixture(scope="module")
def llama_url(tiny_dir, tmp_path_factory):
    anchor = _llama_server()
    from codefill.llamacpp import AnchorUnavailable

    work = tmp_path_factory.mktemp("gguf")
    try:
        gguf = anchor.convert(tiny_dir, work)
        with anchor.server(gguf, threads=1, ctx=MAX_SEQ_LEN) as u:
            yield u
    except AnchorUnavailable as e:
        pytest.skip(f"llama-server cannot run the tiny model here: {e}")


BODIES = {
    "llama.vim": LLAMA_VIM,
    "llama.vim, all fields": {**LLAMA_VIM, "response_fields": None},
    "llama.vscode": {"id_slot": 0, "input_prefix": LLAMA_VIM["input_prefix"], "input_suffix": SUFFIX,
                     "input_extra": [{"text": "import math\n", "time": 1733300000000, "filename": "/w/util.py"}],
                     "prompt": LLAMA_VIM["prompt"], "n_predict": 24, "top_k": 40, "top_p": 0.99, "stream": False,
                     "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "t_max_prompt_ms": 500,
                     "t_max_predict_ms": 2500},
}


@pytest.mark.parametrize("name", list(BODIES))
def test_infill_answers_with_llama_servers_fields(url, llama_url, name):
    body = BODIES[name]
    (status, ours), (llama_status, theirs) = post(url + "/infill", body), post(llama_url + "/infill", body)
    assert status == llama_status == 200, (ours, theirs)
    ours, theirs = _shape(ours), _shape(theirs)
    # generation_settings is llama.cpp's whole sampler configuration; codefill reports its own subset of it.
    if "generation_settings" in theirs:
        settings, all_settings = ours.pop("generation_settings"), theirs.pop("generation_settings")
        assert settings == {k: all_settings[k] for k in settings}
    for shape in (ours, theirs):  # speculative-decoding counters appear only when llama.cpp drafted
        for key in ("draft_n", "draft_n_accepted"):
            shape.get("timings", {}).pop(key, None)
    assert ours == theirs


def test_infill_stream_events_have_llama_servers_fields(url, llama_url):
    body = {**LLAMA_VIM, "stream": True, "response_fields": None}
    ours, theirs = post_events(url + "/infill", body), post_events(llama_url + "/infill", body)
    assert {k for e in ours[:-1] for k in e} == {k for e in theirs[:-1] for k in e}
    assert set(ours[-1]) == set(theirs[-1])
