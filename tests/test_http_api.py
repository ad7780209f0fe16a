"""`codefill http` as clients see it, on a FAKE worker speaking the real ZeroMQ protocol (tests/lsp_fake_worker.py,
a scripted reply): the request bodies llama.vim and llama.vscode send to /infill, streaming, the fields policy
and its 4xx errors, cancellation reaching the worker when the client goes away, and remote-access rules.
The same server on a real worker, with the `openai` package and against llama-server: test_http_e2e.py.
"""

from __future__ import annotations

import json

import pytest

from helpers import make_tiny_model_dir, run_codefill
from http_helpers import get, open_then_drop, post, post_events, running_http, wait_for
from lsp_fake_worker import FakeWorker

REPLY = "return a + b"

# What llama.vim sends (autoload/llama.vim, llama#fim): the lines before the cursor line, the cursor line up to
# the cursor as `prompt`, the rest as input_suffix, ring-buffer chunks as input_extra.
LLAMA_VIM = {
    "id_slot": 0,
    "input_prefix": "def add(a, b):\n",
    "input_suffix": "\n\nprint(add(1, 2))\n",
    "input_extra": [{"text": "def sub(a, b):\n    return a - b\n", "filename": "ops.py"}],
    "prompt": "    ",
    "n_predict": 128,
    "stop": [],
    "n_indent": 4,
    "top_k": 40,
    "top_p": 0.90,
    "samplers": ["top_k", "top_p", "infill"],
    "stream": False,
    "cache_prompt": True,
    "t_max_prompt_ms": 500,
    "t_max_predict_ms": 1000,
    "response_fields": ["content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms",
                        "timings/prompt_per_second", "timings/predicted_n", "timings/predicted_ms",
                        "timings/predicted_per_token_ms", "timings/predicted_per_second", "truncated",
                        "tokens_cached"],
}
# llama.vim's ring-buffer update: evaluate the chunks into the cache, generate nothing.
LLAMA_VIM_WARM = {"id_slot": 0, "input_prefix": "", "input_suffix": "", "input_extra": LLAMA_VIM["input_extra"],
                  "prompt": "", "n_predict": 0, "temperature": 0.0, "samplers": [], "stream": False,
                  "cache_prompt": True, "t_max_prompt_ms": 1, "t_max_predict_ms": 1, "response_fields": [""]}
# What llama.vscode sends (src/llama-server.ts, createRequestPayload): three completions, chunks with a time.
LLAMA_VSCODE = {
    "id_slot": 0,
    "input_prefix": "def add(a, b):\n",
    "input_suffix": "\n",
    "input_extra": [{"text": "import math\n", "time": 1733300000000, "filename": "/work/util.py"}],
    "prompt": "    ",
    "n_predict": 128,
    "n_cmpl": 3,
    "top_k": 40,
    "top_p": 0.99,
    "stream": False,
    "samplers": ["top_k", "top_p", "infill"],
    "cache_prompt": True,
    "n_indent": 4,
    "t_max_prompt_ms": 500,
    "t_max_predict_ms": 2500,
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from codefill.model.checkpoint import TOKENIZER_NAME
    from codefill.model.tokenizer import Tokenizer

    return Tokenizer(tiny_dir / TOKENIZER_NAME)


@pytest.fixture(scope="module")
def fake(tok, tmp_path_factory):
    worker = FakeWorker(tok, f"ipc://{tmp_path_factory.mktemp('fake')}/fake.sock", reply=REPLY).start()
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def url(tiny_dir, fake, tmp_path_factory):
    log = tmp_path_factory.mktemp("http") / "http.log"
    with running_http(tiny_dir, log, "--endpoint", fake.endpoint, "--model-name", "codellama-tiny") as url:
        yield url


@pytest.fixture(autouse=True)
def fresh(fake):
    fake.reply, fake.token_delay_s = REPLY, 0.0
    fake.requests.clear()
    fake.cancelled.clear()


def test_health_says_ok_once_the_worker_answers(url):
    assert get(url + "/health") == (200, {"status": "ok"})


def test_llama_vim_body_gets_the_fields_it_reads(url, fake, tok):
    status, res = post(url + "/infill", LLAMA_VIM)
    assert status == 200, res
    assert set(res) == set(LLAMA_VIM["response_fields"])  # unnested under their full paths, as llama.cpp does
    assert res["content"] == REPLY
    assert res["timings/predicted_n"] == len(tok.encode_infilling(REPLY)) + 1  # the <EOT> too
    for key in ("timings/prompt_ms", "timings/predicted_ms", "timings/prompt_per_second"):
        assert isinstance(res[key], float)
    assert isinstance(res["tokens_cached"], int) and res["truncated"] is False
    [request] = fake.requests
    # the language server's prompt: SPM, the chunk as context before the prefix, the cursor at input_prefix+prompt
    assert request.prompt_ids[:3] == [tok.bos_id, tok.prefix_id, tok.suffix_id]
    assert tok.decode(request.prompt_ids).endswith("def add(a, b):\n    ")
    assert "return a - b" in tok.decode(request.prompt_ids)  # input_extra reached the prompt
    assert request.dedent_column == 4  # n_indent
    assert request.temperature == 0.0  # greedy: llama.vim sends no temperature


def test_llama_vim_cache_warming_request_generates_nothing(url, fake):
    status, res = post(url + "/infill", LLAMA_VIM_WARM)
    assert (status, res) == (200, {})  # response_fields [""] names nothing
    [request] = fake.requests
    assert request.max_new_tokens == 1  # the prompt is evaluated into the worker's cache


def test_llama_vscode_body_gets_three_completions(url, fake):
    status, res = post(url + "/infill", LLAMA_VSCODE)
    assert status == 200, res
    assert isinstance(res, list) and [r["index"] for r in res] == [0, 1, 2]
    assert [r["content"] for r in res] == [REPLY] * 3
    assert len(fake.requests) == 3
    for r in res:  # every field llama-server answers (test_http_e2e compares them with a real one)
        assert {"content", "timings", "tokens_cached", "stop", "stop_type", "tokens_predicted", "tokens_evaluated",
                "generation_settings", "model", "truncated"} <= set(r)
        assert r["stop"] is True and r["stop_type"] == "eos" and r["model"] == "codellama-tiny"
        assert {"prompt_n", "prompt_ms", "predicted_n", "predicted_ms", "cache_n"} <= set(r["timings"])


def test_infill_stream_sends_the_content_in_pieces_then_a_final_event(url):
    events = post_events(url + "/infill", {**LLAMA_VIM, "stream": True, "response_fields": None})
    *pieces, final = events
    assert len(pieces) > 1 and all(e["stop"] is False for e in pieces)
    assert final["stop"] is True and "timings" in final
    assert "".join(e["content"] for e in pieces) + final["content"] == REPLY


def test_completion_endpoint_takes_the_prefix_as_prompt(url, fake, tok):
    """Continue's llama.cpp provider posts /completion with a prompt (the text before the cursor)."""
    status, res = post(url + "/completion", {"prompt": "def add(a, b):\n    ", "n_predict": 16, "stream": False})
    assert status == 200 and res["content"] == REPLY
    assert tok.decode(fake.requests[0].prompt_ids).endswith("def add(a, b):\n    ")


def test_models_lists_the_served_model(url):
    status, res = get(url + "/v1/models")
    assert status == 200 and res["object"] == "list"
    assert [m["id"] for m in res["data"]] == ["codellama-tiny"]


def test_openai_stream_ends_with_done(url):
    events = post_events(url + "/v1/completions", {"prompt": "def add(a, b):\n    ", "suffix": "\n", "stream": True,
                                                   "max_tokens": 16})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == REPLY
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"


@pytest.mark.parametrize("path, body, status, words", [
    ("/infill", {"input_suffix": ""}, 400, ["'input_prefix'", "required"]),
    ("/infill", {"input_prefix": 3, "input_suffix": ""}, 400, ["'input_prefix'", "string", "integer 3"]),
    ("/infill", {"input_prefix": "", "input_suffix": "", "n_predict": -2}, 400, ["'n_predict'", ">= -1", "-2"]),
    ("/infill", {"input_prefix": "", "input_suffix": "", "n_predict": "8"}, 400, ["'n_predict'", "string '8'"]),
    ("/infill", {"input_prefix": "", "input_suffix": "", "n_predit": 8}, 400, ["unknown field", "n_predit"]),
    ("/infill", {"input_prefix": "", "input_suffix": "", "input_extra": {"text": "x"}}, 400, ["input_extra"]),
    ("/infill", {"input_prefix": "", "input_suffix": "", "input_extra": [{"text": 1}]}, 400, ["input_extra[0]"]),
    ("/infill", {"input_prefix": "", "input_suffix": "", "temperature": -1}, 400, ["'temperature'", "-1"]),
    ("/infill", {"input_prefix": "", "input_suffix": "", "top_p": 0}, 400, ["'top_p'", "(0.0, 1.0]"]),
    ("/infill", {"input_prefix": "", "input_suffix": "", "n_cmpl": 99}, 400, ["'n_cmpl'", "<= 8", "99"]),
    ("/infill", {"input_prefix": "", "input_suffix": "", "stop": [1]}, 400, ["'stop'", "strings"]),
    ("/infill", {"input_prefix": "", "input_suffix": "", "min_p": 0.05}, 400, ["'min_p'", "not implemented"]),
    ("/infill", {"input_prefix": "", "input_suffix": "", "n_predict": 100000}, 400, ["100000", "half its context"]),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, ["'prompt'", "batches"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, ["'max_tokens'", "-1"]),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, ["'echo'"]),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, ["'n'", ">= 1"]),
    ("/v1/completions", {"suffix": "x"}, 400, ["'prompt'", "required"]),
    ("/v1/completions", [1, 2], 400, ["JSON object", "array"]),
])
def test_bad_input_gets_a_4xx_json_error_naming_the_value(url, fake, path, body, status, words):
    got, res = post(url + path, body)
    assert got == status, res
    assert res["error"]["code"] == status and res["error"]["type"]
    for w in words:
        assert w in res["error"]["message"], res
    assert fake.requests == []  # nothing reached the worker


def test_not_json_and_unknown_paths_get_json_errors(url):
    status, res = post(url + "/infill", b"{not json")
    assert status == 400 and "not JSON" in res["error"]["message"]
    status, res = post(url + "/nothing", {})
    assert status == 404 and res["error"]["type"] == "not_found_error"


def test_too_large_body_is_refused(url, fake):
    status, res = post(url + "/infill", {"input_prefix": "x" * (9 * 1024 * 1024), "input_suffix": ""})
    assert status == 413 and "larger than" in res["error"]["message"]
    assert fake.requests == []


def test_server_still_serves_after_bad_requests(url):
    post(url + "/infill", b"[")
    status, res = post(url + "/infill", {"input_prefix": "def f():\n    ", "input_suffix": ""})
    assert status == 200 and res["content"] == REPLY


@pytest.mark.parametrize("stream", [True, False])
def test_client_going_away_cancels_the_worker_request(url, fake, stream):
    fake.reply, fake.token_delay_s = "x = 1\n" * 200, 0.05  # ~60 s of tokens: it must be cancelled, not finish
    open_then_drop(url, "/infill", {"input_prefix": "def f():\n", "input_suffix": "", "n_predict": 1000,
                                    "stream": stream}, read_first_event=stream,
                   until=lambda: wait_for(lambda: len(fake.requests) == 1, "the request reaching the worker"))
    wait_for(lambda: fake.cancelled == [fake.requests[0].request_id],
             "a Cancel for the dropped request reaching the worker")


def test_openai_n_cancels_every_choice_when_the_client_goes_away(url, fake):
    fake.reply, fake.token_delay_s = "x = 1\n" * 200, 0.05
    open_then_drop(url, "/v1/completions", {"prompt": "def f():\n", "max_tokens": 1000, "n": 2, "stream": True},
                   read_first_event=True,
                   until=lambda: wait_for(lambda: len(fake.requests) == 2, "both requests reaching the worker"))
    wait_for(lambda: sorted(fake.cancelled) == sorted(r.request_id for r in fake.requests),
             "a Cancel for both choices")


def test_api_key_is_required_when_set(tiny_dir, fake, tmp_path):
    key = tmp_path / "key"
    key.write_text("k" * 32 + "\n")
    with running_http(tiny_dir, tmp_path / "http.log", "--endpoint", fake.endpoint, "--api-key-file", str(key)) as u:
        assert get(u + "/health")[0] == 200  # public, as llama-server's
        status, res = post(u + "/infill", {"input_prefix": "", "input_suffix": ""})
        assert status == 401 and res["error"]["type"] == "authentication_error"
        status, res = post(u + "/infill", {"input_prefix": "", "input_suffix": ""},
                           headers={"Authorization": "Bearer " + "k" * 32})
        assert status == 200 and res["content"] == REPLY


@pytest.mark.parametrize("args, words", [
    (["--host", "0.0.0.0"], ["--allow-remote", "--api-key-file"]),
    (["--host", "0.0.0.0", "--allow-remote"], ["needs --api-key-file"]),
    (["--host", "example.org"], ["not an IP address"]),
    (["--port", "70000"], ["--port 70000", "out of range"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens must be positive, got 0"]),
    (["--tp", "2"], ["--tp starts tensor-parallel workers; --endpoint uses running ones"]),
])
def test_bad_arguments_and_remote_access_without_a_key_are_refused(tiny_dir, fake, args, words):
    done = run_codefill("http", "--port", "0", "--model", tiny_dir, "--endpoint", fake.endpoint, *args, check=False)
    assert done.returncode == 2, done.stderr
    for w in words:
        assert w in done.stderr


# --- Continue: its own FIM template, written out as the prompt -------------------------------------------------


def test_fim_text_reads_prefix_and_suffix_back_in_both_layouts(tok):
    from codefill.http_api.fim_text import split_fim_text

    # Continue's Code Llama template (core/autocomplete/templating/AutocompleteTemplate.ts), PSM
    assert split_fim_text(tok, "<PRE> def f(x):\n    return  <SUF>\nprint(f(1)) <MID>") == \
        ("def f(x):\n    return ", "\nprint(f(1))")
    assert split_fim_text(tok, "<PRE> <SUF>\nprint(f(1)) <MID> def f(x):\n    ") == \
        ("def f(x):\n    ", "\nprint(f(1))")  # SPM
    assert split_fim_text(tok, "<s><PRE> a <SUF>b <MID>") == ("a", "b")
    assert split_fim_text(tok, "def f(x):\n    return ") is None  # a plain prefix
    assert split_fim_text(tok, "<SUF> a <PRE> b <MID>") is None  # markers out of order


@pytest.mark.parametrize("path, body", [
    # Continue's llama.cpp provider (core/llm/llms/LlamaCpp.ts): /completion, its template as the prompt
    ("/completion", {"model": "codellama-7b", "prompt": "<PRE> def add(a, b):\n     <SUF>\n\nprint(add(1, 2)) <MID>",
                     "stream": True, "n_predict": 32, "stop": ["<PRE>", "<SUF>", "<MID>", "<EOT>"],
                     "temperature": 0.01}),
    # Continue's OpenAI-compatible provider (core/llm/llms/OpenAI.ts, legacy completions): the same prompt
    ("/v1/completions", {"model": "codellama-7b", "prompt": "<PRE> def add(a, b):\n     <SUF>\n\nprint(add(1, 2)) "
                         "<MID>", "max_tokens": 32, "temperature": 0.01, "stop": ["<PRE>", "<SUF>", "<MID>", "<EOT>"],
                         "stream": True}),
])
def test_continue_template_prompt_gets_the_same_prompt_as_infill(url, fake, path, body):
    events = post_events(url + path, body)
    text = "".join(e["content"] if "content" in e else e["choices"][0]["text"] for e in events if e != "[DONE]")
    assert text == REPLY
    status, _ = post(url + "/infill", {"input_prefix": "def add(a, b):\n    ", "input_suffix": "\n\nprint(add(1, 2))",
                                       "n_predict": 32})
    assert status == 200
    assert fake.requests[0].prompt_ids == fake.requests[1].prompt_ids


def test_readme_curl_example_is_answered(url):
    """The README's `curl ... /infill -d '...'` line, its body sent as written."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    [line] = [l for l in readme.splitlines() if l.startswith("curl -s http://127.0.0.1:8012/infill -d '")]
    body = line.split(" -d '", 1)[1].rstrip("'")
    status, res = post(url + "/infill", body.encode())
    assert status == 200 and res["content"] == REPLY


@pytest.mark.parametrize("stream", [False, True])
def test_partial_identifier_is_healed_and_left_out_of_the_answer(url, fake, stream):
    """Token healing, as in the language server: "retu" leaves the prompt, the worker must start with it."""
    body = {"input_prefix": "def add(a, b):\n", "prompt": "    retu", "input_suffix": "\n", "stream": stream}
    if stream:
        text = "".join(e["content"] for e in post_events(url + "/infill", body))
    else:
        status, res = post(url + "/infill", body)
        assert status == 200
        text = res["content"]
    assert text == REPLY[len("retu"):]
    assert fake.requests[0].required_prefix == "retu"


def test_a_newline_stop_asks_for_one_line_with_the_editor_rules(url, fake):
    """stop "\\n": the language server's single-line rules; the auto-closed ")" after the cursor is not repeated."""
    fake.reply = "2)"
    status, res = post(url + "/v1/completions", {"prompt": "print(add(1, ", "suffix": ")\n", "stop": ["\n"]})
    assert status == 200 and res["choices"][0]["text"] == "2"
    assert fake.requests[0].stop_at_eol and "\n" not in fake.requests[0].stop_strings
    fake.requests.clear()
    status, res = post(url + "/v1/completions", {"prompt": "print(add(1, ", "suffix": ")\n"})
    assert status == 200 and res["choices"][0]["text"] == "2)"  # raw, as llama-server answers
    assert not fake.requests[0].stop_at_eol
