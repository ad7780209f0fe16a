"""Benchmark of the language server as an editor drives it: keystroke replay through the real server.

`run(out_dir, model_dir=None, preset="small", ...)` starts `codefill serve` (which starts its worker) with a
real LSP client (pygls), opens a Python standard-library file with a region cut out, and types that region
back character by character: one didChange and one textDocument/inlineCompletion request per keystroke,
cancelling ($/cancelRequest) a request still unanswered when the next key is pressed, as an editor does.
Two passes:

- `paced`: a key every `interval_ms` (a fast typist); superseded requests are cancelled;
- `serial`: the next key only after the previous suggestion arrived (latency without overlap).

Per pass: p50/p95 keystroke-to-suggestion (a request's send to its answer, over answered requests),
requests cancelled, model calls per keystroke (the server's own count, prefetches listed apart) and the
suggestion-cache hit rate, from `codefill/stats`. Random weights (`preset`, unless `model_dir` is given)
never suggest what the file goes on with, so typed-ahead hits are rare here; with a real model they are not.
Then the anchor: the same keystrokes, serially, through llama.cpp's `llama-server` `/infill` with
`cache_prompt` (as llama.vim uses it) on the same weights converted to GGUF (`codefill/llamacpp.py`), with a
prefix and suffix cut to the same token budget. The server builds its own FIM prompt (PSM order; codefill
sends SPM), so this compares latency, not suggestions. When llama.cpp cannot be built the report says why.
Writes `lsp.json`, `lsp.md` and `lsp_latency.png` (every answered keystroke's suggestion latency per pass,
bench_chart.py) to out_dir and returns the JSON's dict.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

from codefill.bench_chart import chart_link, latency_chart
from codefill.bench_workers import SOURCE_FILE, _model_dir, _percentile, source_name


async def _unanswered(fut: asyncio.Future) -> int:
    """1 if the request ended without an answer (cancelled by the server, or failed), else 0."""
    try:
        await fut
    except Exception:
        return 1
    return 0


def _summary(n_keys: int, interval_ms: float | None, latencies: list[float], cancelled: int, before, after) -> dict:
    """One pass's row, from its latencies and the server's `codefill/stats` before and after it."""
    model_calls = after.model_calls - before.model_calls
    prefetches = after.prefetches - before.prefetches
    hits = after.cache_hits - before.cache_hits
    lookups = hits + after.cache_misses - before.cache_misses
    return {
        "keystrokes": n_keys, "interval_ms": interval_ms, "answered": len(latencies), "cancelled": cancelled,
        "suggestion_ms_p50": round(_percentile(latencies, 50), 1) if latencies else None,
        "suggestion_ms_p95": round(_percentile(latencies, 95), 1) if latencies else None,
        "model_calls_per_keystroke": round(model_calls / n_keys, 3),
        "prefetches_per_keystroke": round(prefetches / n_keys, 3),
        "cache_hit_rate": round(hits / lookups, 3) if lookups else 0.0,
    }


@contextlib.asynccontextmanager
async def serving(model_dir: Path, options: dict, max_seq_len: int):
    """A pygls client of a `codefill serve --stdio` on model_dir, initialised with `options`; shut down after."""
    from lsprotocol import types
    from pygls.lsp.client import LanguageClient

    client = LanguageClient("codefill-bench", "1")
    await client.start_io(sys.executable, "-m", "codefill.cli", "serve", "--stdio", "--model", str(model_dir),
                          "--worker-max-seq-len", str(max_seq_len))
    try:
        await client.initialize_async(types.InitializeParams(capabilities=types.ClientCapabilities(),
                                                             initialization_options=options))
        client.initialized(types.InitializedParams())
        yield client
    finally:
        try:
            await asyncio.wait_for(client.shutdown_async(None), 30)
            client.exit(None)
        finally:
            await client.stop()


def open_document(client, uri: str, text: str) -> None:
    from lsprotocol import types

    client.text_document_did_open(types.DidOpenTextDocumentParams(
        types.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))


def inline_request(client, uri: str, line: int, col: int, msg_id: str) -> asyncio.Future:
    """An automatic textDocument/inlineCompletion at (line, col), sent now, as an asyncio future."""
    from lsprotocol import types

    params = types.InlineCompletionParams(
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic),
        text_document=types.TextDocumentIdentifier(uri), position=types.Position(line, col))
    return asyncio.wrap_future(client.protocol.send_request(types.TEXT_DOCUMENT_INLINE_COMPLETION, params,
                                                            msg_id=msg_id))


def replay_cursor(text: str) -> int:
    """Where the replay types: the start of a line well inside the file."""
    return text.index("\n", 12_000) + 1


def line_col(text: str, offset: int) -> tuple[int, int]:
    return text[:offset].count("\n"), offset - (text.rfind("\n", 0, offset) + 1)


async def replay(client, text: str, cursor: int, n_keys: int, interval_ms: float | None) -> tuple[dict, list[float]]:
    """Type text[cursor:cursor + n_keys] into a document that lacks it, a request per keystroke: the pass's
    summary and the latency of every answered keystroke (ms). Its first request (compiling, if the worker is
    new) is not counted."""
    from lsprotocol import types

    uri = "file:///bench/" + SOURCE_FILE
    typed = text[cursor:cursor + n_keys]
    open_document(client, uri, text[:cursor] + text[cursor + n_keys:])  # the region to type is not there yet
    line, col = line_col(text, cursor)
    await asyncio.wait_for(inline_request(client, uri, line, col, "warm-up"), 900)
    before = await client.protocol.send_request_async("codefill/stats", {})

    latencies: list[float] = []
    cancelled = 0
    pending: tuple[str, asyncio.Future, float] | None = None
    version = 1
    for i, ch in enumerate(typed):
        if pending is not None and not pending[1].done():
            client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id=pending[0]))
        if pending is not None:
            cancelled += await _unanswered(pending[1])
        version += 1
        client.text_document_did_change(types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
            content_changes=[types.TextDocumentContentChangePartial(
                range=types.Range(types.Position(line, col), types.Position(line, col)), text=ch)]))
        line, col = (line + 1, 0) if ch == "\n" else (line, col + 1)
        msg_id, sent = f"key-{i}", time.perf_counter()
        fut = inline_request(client, uri, line, col, msg_id)
        fut.add_done_callback(lambda f, sent=sent: f.cancelled() or f.exception() is not None
                              or latencies.append((time.perf_counter() - sent) * 1000))
        pending = (msg_id, fut, sent)
        if interval_ms is None:
            cancelled += await _unanswered(fut)
            pending = None
        else:
            await asyncio.sleep(interval_ms / 1000)
    if pending is not None:
        cancelled += await _unanswered(pending[1])
    after = await client.protocol.send_request_async("codefill/stats", {})
    return _summary(n_keys, interval_ms, latencies, cancelled, before, after), latencies


async def _pass(model_dir: Path, text: str, cursor: int, n_keys: int, interval_ms: float | None,
                options: dict, max_seq_len: int) -> tuple[dict, list[float]]:
    """One pass on a server of its own."""
    async with serving(model_dir, options, max_seq_len) as client:
        return await replay(client, text, cursor, n_keys, interval_ms)


def _llama_server_pass(model_dir: Path, work: Path, text: str, cursor: int, n_keys: int, max_new_tokens: int,
                       max_prompt_tokens: int) -> tuple[dict, list[float]]:
    """The serial pass against llama-server's /infill; ({"unavailable": why}, []) when it cannot run."""
    import urllib.request

    from codefill import llamacpp
    from codefill.inference_workers.sharding import load_tokenizer

    try:
        anchor = llamacpp.ensure()
        gguf = anchor.convert(model_dir, work)
    except llamacpp.AnchorUnavailable as e:
        return {"unavailable": str(e)}, []
    tok = load_tokenizer(model_dir)
    # One window for every keystroke, as an editor plugin keeps it while the user types on one line: the prefix
    # starts where the last keystroke's prefix fits 3/4 of the budget, the suffix is cut to the rest.
    start = 0
    while len(tok.encode(text[start:cursor + n_keys])) > 3 * max_prompt_tokens // 4:
        start = text.index("\n", start + (cursor + n_keys - start) // 8) + 1
    suffix = text[cursor + n_keys:]
    while len(tok.encode(suffix)) > max_prompt_tokens // 4:
        suffix = suffix[:suffix.rindex("\n", 0, len(suffix) * 7 // 8) + 1]

    def window(prefix: str, _: str) -> tuple[str, str]:
        return prefix[start:], suffix

    latencies = []
    with anchor.server(gguf, threads=os.cpu_count() or 1, log=work / "llama-server.log") as url:
        for k in range(n_keys + 1):  # the first request fills the cache, as the LSP passes' first keystroke does
            prefix, suffix = window(text[:cursor + k], text[cursor + n_keys:])
            body = json.dumps({"input_prefix": prefix, "input_suffix": suffix, "n_predict": max_new_tokens,
                               "cache_prompt": True, "temperature": 0.0, "top_k": 1}).encode()
            request = urllib.request.Request(url + "/infill", data=body, headers={"Content-Type": "application/json"})
            t = time.perf_counter()
            with urllib.request.urlopen(request, timeout=120) as reply:
                json.loads(reply.read())
            if k:
                latencies.append(1e3 * (time.perf_counter() - t))
    row = {"keystrokes": n_keys, "answered": len(latencies), "version": anchor.version,
           "suggestion_ms_p50": round(_percentile(latencies, 50), 1),
           "suggestion_ms_p95": round(_percentile(latencies, 95), 1)}
    return row, latencies


def run(out_dir: str | Path, model_dir: str | Path | None = None, preset: str = "small", *, seed: int = 0,
        keystrokes: int = 40, interval_ms: float = 60.0, max_new_tokens: int = 16, max_prompt_tokens: int = 1024,
        max_seq_len: int = 2048) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = _model_dir(out_dir, model_dir, preset, seed)
    from codefill.model.checkpoint import read_model_config

    max_seq_len = min(max_seq_len, read_model_config(model_dir)[0].max_seq_len)  # the model's own context
    max_prompt_tokens = min(max_prompt_tokens, max_seq_len - max_new_tokens)
    source = Path(sysconfig.get_paths()["stdlib"]) / SOURCE_FILE
    text = source.read_text()
    cursor = replay_cursor(text)
    options = {"max_new_tokens": max_new_tokens, "max_prompt_tokens": max_prompt_tokens,
               "log_dir": str(out_dir / "lsp-telemetry")}
    report: dict = {
        "model_dir": str(model_dir), "preset": preset, "source": source_name(), "max_new_tokens": max_new_tokens,
        "max_prompt_tokens": max_prompt_tokens, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "passes": {},
    }
    latencies: dict[str, list[float]] = {}
    for name, interval in (("paced", interval_ms), ("serial", None)):
        report["passes"][name], latencies[name] = asyncio.run(_pass(model_dir, text, cursor, keystrokes, interval,
                                                                    options, max_seq_len))
    report["llama_server"], anchor_latencies = _llama_server_pass(model_dir, out_dir / "anchor", text, cursor,
                                                                  keystrokes, max_new_tokens, max_prompt_tokens)
    if anchor_latencies:
        latencies["llama-server serial"] = anchor_latencies
    report["latency_chart"] = latency_chart(out_dir / "lsp_latency.png", {"keystroke to suggestion": latencies},
                                            title=f"Language server latency, {model_dir.name}").name
    (out_dir / "lsp.json").write_text(json.dumps(report, indent=2))
    (out_dir / "lsp.md").write_text(_markdown(report))
    return report


def _markdown(r: dict) -> str:
    lines = [
        "# Language server benchmark (`codefill bench lsp`)", "",
        f"Model {r['model_dir']} (preset {r['preset']}, random weights unless given); prompts of at most "
        f"{r['max_prompt_tokens']} tokens, suggestions of at most {r['max_new_tokens']} tokens; typing "
        f"{r['source']} through `codefill serve` with one inlineCompletion per keystroke. Machine: {r['machine']}.",
        "",
        "| pass | keystrokes | key interval ms | answered | cancelled | suggestion p50 ms | suggestion p95 ms | "
        "model calls / key | prefetches / key | cache hit rate |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, p in r["passes"].items():
        lines.append(f"| {name} | {p['keystrokes']} | {p['interval_ms'] or 'after answer'} | {p['answered']} | "
                     f"{p['cancelled']} | {p['suggestion_ms_p50']} | {p['suggestion_ms_p95']} | "
                     f"{p['model_calls_per_keystroke']} | {p['prefetches_per_keystroke']} | {p['cache_hit_rate']:.1%} |")
    lines += ["", "`paced`: a key every interval, unanswered requests cancelled when the next key comes; "
              "`serial`: the next key after the answer. Suggestion latency: request sent to answer received.", ""]
    anchor = r.get("llama_server", {})
    if "unavailable" in anchor:
        lines += [f"llama-server on the same weights: not measured: {anchor['unavailable']}", ""]
    elif anchor:
        ratio = r["passes"]["serial"]["suggestion_ms_p50"] / anchor["suggestion_ms_p50"]
        lines += [f"**Against llama-server** ({anchor['version']}, `/infill` with `cache_prompt`, same weights as "
                  f"f32 GGUF, same keystrokes, serial): suggestion p50 {anchor['suggestion_ms_p50']} ms, p95 "
                  f"{anchor['suggestion_ms_p95']} ms; codefill's serial p50 is {ratio:.2f}x llama-server's.", ""]
    if r.get("latency_chart"):
        lines += chart_link(r["latency_chart"], "every answered keystroke of each pass")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "bench_results",
                         preset=sys.argv[2] if len(sys.argv) > 2 else "small"), indent=2))
