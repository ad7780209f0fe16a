"""`codefill demo`: what README command (a) shows a new user.

It starts `codefill serve --stdio` on a model directory exactly as an editor would, opens a small Python
file over LSP, puts the cursor in the middle of a function and asks for an inline completion and a
completion, then prints what came back and how long it took. It is a real LSP client (pygls), so the
demo exercises the same path an editor does: LSP -> prompt building -> ZeroMQ -> worker -> model.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from lsprotocol import types
from pygls.lsp.client import LanguageClient

SAMPLE = '''def mean(values):
    """Return the arithmetic mean of a non-empty list of numbers."""
    total = 0
    for v in values:
        total += v
    return 

def median(values):
    ordered = sorted(values)
    return ordered[len(ordered) // 2]
'''
# The cursor sits after "return " in mean(): the model fills in the expression.
CURSOR = types.Position(line=5, character=11)


async def _demo(model_dir: Path) -> int:
    client = LanguageClient("codefill-demo", "0.1")
    await client.start_io(sys.executable, "-m", "codefill.cli", "serve", "--stdio", "--model", str(model_dir))
    try:
        started = time.perf_counter()
        await client.initialize_async(types.InitializeParams(
            capabilities=types.ClientCapabilities(),
            initialization_options={},
        ))
        client.initialized(types.InitializedParams())
        uri = "file:///demo/stats.py"
        client.text_document_did_open(types.DidOpenTextDocumentParams(
            text_document=types.TextDocumentItem(uri=uri, language_id="python", version=1, text=SAMPLE)))
        print(f"server up in {time.perf_counter() - started:.1f} s (model {model_dir})")
        lines = SAMPLE.splitlines()
        print("cursor:", repr(lines[CURSOR.line][: CURSOR.character]) + " |")

        t0 = time.perf_counter()
        inline = await client.text_document_inline_completion_async(types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri), position=CURSOR,
            context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked)))
        t_inline = (time.perf_counter() - t0) * 1000
        items = inline.items if isinstance(inline, types.InlineCompletionList) else (inline or [])
        print(f"inline completion ({t_inline:.0f} ms): " + json.dumps([i.insert_text for i in items]))

        t0 = time.perf_counter()
        comp = await client.text_document_completion_async(types.CompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri), position=CURSOR))
        t_comp = (time.perf_counter() - t0) * 1000
        citems = comp.items if isinstance(comp, types.CompletionList) else (comp or [])
        print(f"completion ({t_comp:.0f} ms): " + json.dumps([c.label for c in citems]))
        await client.shutdown_async(None)
        client.exit(None)
        return 0 if items else 1
    finally:
        await client.stop()


def run_demo(model_dir: Path) -> None:
    if not (model_dir / "config.json").exists():
        from codefill.cli import CliError

        raise CliError(f"no model directory at {model_dir} (the bundled one is models/codefill-pypi-5m; its "
                       f"model card, models/codefill-pypi-5m/README.md, has the commands that rebuild it)")
    code = asyncio.run(_demo(model_dir))
    if code:
        print("the server answered with no inline completion item", file=sys.stderr)
        sys.exit(code)
