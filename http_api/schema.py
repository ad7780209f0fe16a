"""What an HTTP client may send: llama.cpp's `/infill` (and `/completion`) and OpenAI's `/v1/completions`
bodies, each checked into one `CompletionRequest`.

The fields policy, the same for both APIs:

- fields codefill implements are checked (type, range) and honoured;
- fields that only steer llama.cpp's or OpenAI's own machinery (`id_slot`, `samplers`, `cache_prompt`:
  codefill's workers always reuse cached prefixes, `t_max_*_ms`, `model`: one model is served, `user`...)
  are accepted and ignored (`IGNORED`);
- fields that would change the answer in a way codefill does not implement (`min_p`, penalties, `grammar`,
  `logprobs`, `echo`, `lora`...) are accepted only at their neutral value, else refused (`NEUTRAL`);
- any other field is refused, with the list of known ones: a typo (`n_predcit`) must not pass silently.

Every refusal is an `HttpError` (status 400) naming the field and the value. Token counts are checked against
the worker later (http_api/generation.py), when its context is known.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

from codefill.errors import CodefillError
from codefill.lsp.prompt import Chunk

MAX_N = 8  # completions per request (n, n_cmpl): each is one worker request
MAX_STOPS = 16  # stop strings per request


class HttpError(CodefillError, ValueError):
    """A request the HTTP server refuses; `status` is the HTTP status, the message names the values."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


@dataclass(frozen=True)
class CompletionRequest:
    """One request of either API, in codefill's terms: a cursor between `prefix` and `suffix`."""

    prefix: str  # the text before the cursor (llama.cpp: input_prefix + prompt; OpenAI: prompt)
    suffix: str  # the text after it
    chunks: tuple[Chunk, ...] = ()  # other files (input_extra), placed before the prefix as lsp/prompt.py does
    max_tokens: int | None = None  # None: the server's default; 0: only evaluate the prompt (warm the cache)
    temperature: float = 0.0  # 0: greedy, what the workers' prefix reuse is built for
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    n: int = 1
    stream: bool = False
    n_indent: int = 0  # llama.cpp: a generated line indented less than this ends the answer
    response_fields: tuple[str, ...] | None = None  # llama.cpp: only these (slash paths unnested)
    return_tokens: bool = False

    @property
    def one_line(self) -> bool:
        """The client asks for one line (a "\\n" stop): the language server's single-line rules apply."""
        return "\n" in self.stop


# --- field checks -----------------------------------------------------------------------------------------


def _type_name(v: Any) -> str:
    return "null" if v is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                      list: "array", dict: "object"}.get(type(v), type(v).__name__)


def _bad(field: str, value: Any, what: str) -> HttpError:
    shown = repr(value) if not isinstance(value, str) or len(value) <= 60 else repr(value[:60]) + "..."
    return HttpError(f"field {field!r} must be {what}, got {_type_name(value)} {shown}")


def _str(body: dict, field: str, default: str | None = None) -> str:
    v = body.get(field, default)
    if not isinstance(v, str):
        raise _bad(field, v, "a string")
    return v


def _int(body: dict, field: str, default: int, lo: int, hi: int | None = None) -> int:
    v = body.get(field, default)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        raise _bad(field, v, f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""))
    return v


def _num(body: dict, field: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(field, default)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) \
            or v < lo or v > hi or (lo_open and v == lo):
        raise _bad(field, v, f"a number in {'(' if lo_open else '['}{lo}, {hi}]")
    return float(v)


def _bool(body: dict, field: str, default: bool) -> bool:
    v = body.get(field, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(field, v, "true or false")
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise _bad("stop", v, "a string or an array of strings")
    if len(v) > MAX_STOPS:
        raise _bad("stop", v, f"at most {MAX_STOPS} strings")
    return tuple(s for s in v if s)


def _seed(body: dict) -> int:
    v = body.get("seed")
    if v is None or v == -1:  # llama.cpp's -1: a random seed
        return secrets.randbelow(2**31)
    return _int(body, "seed", 0, 0, 2**63 - 1)


def _chunks(body: dict) -> tuple[Chunk, ...]:
    v = body.get("input_extra")
    if v is None:
        return ()
    what = 'an array of {"filename": string, "text": string}'
    if not isinstance(v, list):
        raise _bad("input_extra", v, what)
    out = []
    for i, c in enumerate(v):
        # Other keys of a chunk are ignored, as llama.cpp does: llama.vscode sends a "time" too.
        if not isinstance(c, dict) or not isinstance(c.get("text"), str) \
                or not isinstance(c.get("filename", ""), str):
            raise _bad(f"input_extra[{i}]", c, 'an object {"filename": string, "text": string}')
        out.append(Chunk(c.get("filename") or "", c["text"]))
    return tuple(out)


def _response_fields(body: dict) -> tuple[str, ...] | None:
    v = body.get("response_fields")
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise _bad("response_fields", v, "an array of strings")
    return tuple(v)


def _check_fields(body: Any, known: set[str], ignored: set[str], neutral: dict[str, tuple]) -> dict:
    if not isinstance(body, dict):
        raise HttpError(f"the request body must be a JSON object, got {_type_name(body)}")
    unknown = sorted(set(body) - known - ignored - set(neutral))
    if unknown:
        raise HttpError(f"unknown field(s) {', '.join(unknown)}; codefill knows {', '.join(sorted(known))} "
                        f"(and ignores {', '.join(sorted(ignored))})")
    for field, allowed in neutral.items():
        if field in body and body[field] not in allowed:
            raise HttpError(f"field {field!r} = {body[field]!r} is not implemented by codefill; leave it out or "
                            f"send {allowed[0]!r}", kind="not_supported_error")
    return body


# --- llama.cpp ----------------------------------------------------------------------------------------------

LLAMA_IGNORED = {"id_slot", "samplers", "cache_prompt", "t_max_prompt_ms", "t_max_predict_ms", "model", "n_keep",
                 "n_discard", "n_cache_reuse", "timings_per_token", "return_progress", "verbose", "sse_ping_interval",
                 "post_sampling_probs", "min_keep", "stream_options", "top_n_sigma", "dry_base",
                 "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers", "repeat_last_n",
                 "mirostat_tau", "mirostat_eta", "dynatemp_exponent", "xtc_threshold"}
# Neutral values first: the one the error message suggests.
LLAMA_NEUTRAL: dict[str, tuple] = {
    "min_p": (0, 0.0, None), "typical_p": (1, 1.0, None), "repeat_penalty": (1, 1.0, None),
    "presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None), "mirostat": (0, None),
    "dynatemp_range": (0, 0.0, None), "xtc_probability": (0, 0.0, None), "dry_multiplier": (0, 0.0, None),
    "n_probs": (0, None), "logprobs": (0, None), "ignore_eos": (False, None), "grammar": ("", None),
    "json_schema": (None,), "logit_bias": ([], {}, None), "lora": ([], None), "adaptive_target": (None,),
}
INFILL_FIELDS = {"input_prefix", "input_suffix", "input_extra", "prompt", "n_predict", "max_tokens", "temperature",
                 "top_k", "top_p", "seed", "stop", "n_cmpl", "n", "stream", "n_indent", "response_fields",
                 "return_tokens"}


def _llama_common(body: dict, prefix: str, suffix: str, chunks: tuple[Chunk, ...]) -> CompletionRequest:
    if "n_predict" in body and "max_tokens" in body:
        raise HttpError("give n_predict or its alias max_tokens, not both")
    field = "max_tokens" if "max_tokens" in body else "n_predict"
    n_predict = _int(body, field, -1, -1)
    n_field = "n" if "n" in body and "n_cmpl" not in body else "n_cmpl"
    return CompletionRequest(
        prefix=prefix, suffix=suffix, chunks=chunks,
        max_tokens=None if n_predict == -1 else n_predict,
        temperature=_num(body, "temperature", 0.0, 0.0, 100.0),
        top_k=_int(body, "top_k", 0, 0), top_p=_num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=_seed(body), stop=_stop(body), n=_int(body, n_field, 1, 1, MAX_N),
        stream=_bool(body, "stream", False), n_indent=_int(body, "n_indent", 0, 0),
        response_fields=_response_fields(body), return_tokens=_bool(body, "return_tokens", False))


def infill_request(body: Any) -> CompletionRequest:
    """llama.cpp's /infill: the cursor is between input_prefix + prompt and input_suffix (llama.vim and
    llama.vscode send the cursor line's text before the cursor as `prompt`, after llama.cpp's FIM_MID)."""
    body = _check_fields(body, INFILL_FIELDS, LLAMA_IGNORED, LLAMA_NEUTRAL)
    for field in ("input_prefix", "input_suffix"):
        if field not in body:
            raise HttpError(f"field {field!r} is required")
    prefix = _str(body, "input_prefix") + _str(body, "prompt", "")
    return _llama_common(body, prefix, _str(body, "input_suffix"), _chunks(body))


def completion_request(body: Any) -> CompletionRequest:
    """llama.cpp's /completion (Continue's llama.cpp provider): `prompt` is the text before the cursor."""
    body = _check_fields(body, INFILL_FIELDS - {"input_prefix", "input_suffix", "input_extra"}, LLAMA_IGNORED,
                         LLAMA_NEUTRAL)
    if "prompt" not in body:
        raise HttpError("field 'prompt' is required")
    return _llama_common(body, _str(body, "prompt"), "", ())


# --- OpenAI -------------------------------------------------------------------------------------------------

OPENAI_FIELDS = {"model", "prompt", "suffix", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "seed"}
OPENAI_IGNORED = {"user", "stream_options", "extra_body"}
OPENAI_NEUTRAL: dict[str, tuple] = {
    "echo": (False, None), "best_of": (1, None), "logprobs": (None, 0), "logit_bias": (None, {}),
    "presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None),
}


def openai_request(body: Any) -> CompletionRequest:
    """OpenAI's /v1/completions: the cursor is between `prompt` and `suffix`."""
    body = _check_fields(body, OPENAI_FIELDS, OPENAI_IGNORED, OPENAI_NEUTRAL)
    if "prompt" not in body:
        raise HttpError("field 'prompt' is required")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one
    if not isinstance(prompt, str):
        raise _bad("prompt", prompt, "a string (or an array of one string; batches and token ids are not served)")
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise _bad("suffix", suffix, "a string or null")
    max_tokens = body.get("max_tokens")
    return CompletionRequest(
        prefix=prompt, suffix=suffix or "",
        max_tokens=None if max_tokens is None else _int(body, "max_tokens", 0, 0),
        temperature=_num(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=_seed(body), stop=_stop(body), n=_int(body, "n", 1, 1, MAX_N), stream=_bool(body, "stream", False))
