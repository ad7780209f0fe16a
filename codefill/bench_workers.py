"""Benchmark of the serving engine as an editor uses it: a real worker over ZeroMQ, one request per keystroke.

`run(out_dir, model_dir=None, preset="small", ...)` measures, with random weights for `preset` unless a model
directory is given:

(b) keystroke replay: a Python standard library file is typed character by character; every keystroke sends
    the SPM infilling prompt of the text around the cursor (about `context_tokens` ids: the suffix first,
    then the prefix, so typing appends to the prompt) and waits for the complete suggestion (`max_new_tokens`
    or end of line). Time to first token (TTFT) and to the complete suggestion, p50/p95, for three workers:
    `full` (prefix reuse + in-flight extension), `reuse` (prefix reuse only), `cold` (neither: every
    keystroke prefills its whole prompt). The cost ratio is cold TTFT / full TTFT: what a keystroke costs
    against a cold prefill of the same prompt (target >= 10x). Random weights never suggest what the file
    goes on with, so an `accept` run also types the model's own suggestion, one token's text per keystroke
    (an editor's "accept next word"), the case in-flight extension is for: where the typed text re-tokenizes
    onto the suggested ids the rest of the suggestion streams at once; where it does not, the slot rolls back.
(c) 4 and 8 simulated typists, each typing its own part of the file on its own connection at once, against
    the `full` worker: p95 of the complete-suggestion time against the single typist's p50 (target <= 2x).
    Each typist's first request (the cold prefill of opening the file) is a warm-up, not counted.

Every worker has the same `max_batch` slots, so a decode step costs the same for one typist as for eight.
Writes `workers.json`, `workers.md` and `workers_latency.png` (every keystroke's TTFT and complete-suggestion
time per worker, bench_chart.py) to out_dir and returns the same dict as the JSON.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from codefill.bench_chart import chart_link, latency_chart

SOURCE_FILE = "argparse.py"  # long enough for 8 typists with 1,500-token contexts each


@dataclass
class Keystroke:
    ttft_s: float
    complete_s: float
    n_prompt: int
    n_reused: int
    n_replayed: int
    n_generated: int


def source_name() -> str:
    """The replayed file as reports name it: no path of the machine that ran the benchmark."""
    return f"the standard library's {SOURCE_FILE} (Python {sysconfig.get_python_version()})"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _summary(strokes: list[Keystroke]) -> dict:
    ttft = [k.ttft_s * 1000 for k in strokes]
    done = [k.complete_s * 1000 for k in strokes]
    return {
        "n": len(strokes),
        "ttft_ms_p50": round(_percentile(ttft, 50), 1), "ttft_ms_p95": round(_percentile(ttft, 95), 1),
        "complete_ms_p50": round(_percentile(done, 50), 1), "complete_ms_p95": round(_percentile(done, 95), 1),
        "prompt_tokens_mean": round(statistics.mean(k.n_prompt for k in strokes), 1),
        "reused_fraction_mean": round(statistics.mean(k.n_reused / k.n_prompt for k in strokes), 3),
        "replayed_tokens_total": sum(k.n_replayed for k in strokes),
        "generated_tokens_mean": round(statistics.mean(k.n_generated for k in strokes), 1),
    }


class Document:
    """A file being typed at `cursor`: the prompt keeps a fixed window of text around the typed region."""

    def __init__(self, tok, text: str, cursor: int, context_tokens: int):
        self.tok, self.text, self.cursor = tok, text, cursor
        # ~3/4 of the context before the cursor, ~1/4 after, measured once at the start so the prefix's
        # first character never moves while typing (its tokens then stay a prefix of the next prompt's).
        self.start = self._back(cursor, context_tokens * 3 // 4)
        self.typed = ""
        self.suffix = ""
        self.suffix_end = self._forward(cursor, context_tokens // 4)

    def _back(self, end: int, n_tokens: int) -> int:
        start = max(0, end - n_tokens * 3)
        while start > 0 and len(self.tok.encode(self.text[start:end])) < n_tokens:
            start = max(0, start - 200)
        return start

    def _forward(self, begin: int, n_tokens: int) -> int:
        end = min(len(self.text), begin + n_tokens * 3)
        while end < len(self.text) and len(self.tok.encode_infilling(self.text[begin:end])) < n_tokens:
            end = min(len(self.text), end + 200)
        return end

    def prompt(self, suffix_from: int) -> list[int]:
        from codefill.model.fim import infilling_prompt_tokens

        prefix = self.text[self.start:self.cursor] + self.typed
        return infilling_prompt_tokens(self.tok, prefix, self.text[suffix_from:self.suffix_end], spm=True)


def _keystroke(client, tok, prompt: list[int], max_new_tokens: int) -> tuple[Keystroke, list[int]]:
    from codefill.inference_workers.client import StopRules
    from codefill.inference_workers.protocol import Token

    t0 = time.perf_counter()
    ttft = None
    ids: list[int] = []
    for msg in client.generate(prompt, max_new_tokens, stop_ids=[tok.eot_id, tok.eos_id],
                               rules=StopRules(stop_at_eol=True)):
        if isinstance(msg, Token):
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            ids.append(msg.token_id)
        else:
            done = time.perf_counter() - t0
            return Keystroke(ttft if ttft is not None else done, done, msg.n_prompt, msg.n_reused, msg.n_replayed,
                             msg.n_generated), ids
    raise RuntimeError("stream ended without Finished")


def _type_file(client, tok, text: str, cursor: int, n_keys: int, context_tokens: int,
               max_new_tokens: int) -> list[Keystroke]:
    """Type text[cursor:cursor+n_keys] one character at a time; the first request (opening) is not counted."""
    doc = Document(tok, text, cursor, context_tokens)
    suffix_from = cursor + n_keys  # the typed region is what the document did not have yet
    _keystroke(client, tok, doc.prompt(suffix_from), max_new_tokens)
    out = []
    for ch in text[cursor:cursor + n_keys]:
        doc.typed += ch
        out.append(_keystroke(client, tok, doc.prompt(suffix_from), max_new_tokens)[0])
    return out


def _type_suggestions(client, tok, text: str, cursor: int, n_keys: int, context_tokens: int,
                      max_new_tokens: int) -> list[Keystroke]:
    """Accept the model's suggestion one token's text at a time (as an editor's "accept next word"): each
    keystroke appends the text of the first token of the latest suggestion."""
    doc = Document(tok, text, cursor, context_tokens)
    _, ids = _keystroke(client, tok, doc.prompt(cursor), max_new_tokens)
    out = []
    while len(out) < n_keys:
        piece = tok.decode_infilling(ids[:1]) if ids else ""
        doc.typed += piece or " x"  # the model suggested nothing (or a control id): the user types on
        stroke, ids = _keystroke(client, tok, doc.prompt(cursor), max_new_tokens)
        out.append(stroke)
    return out


def _typists(endpoint: str, tok, text: str, n: int, n_keys: int, context_tokens: int,
             max_new_tokens: int) -> list[Keystroke]:
    from codefill.inference_workers.client import WorkerClient

    span = (len(text) - 20_000) // n
    results: list[list[Keystroke]] = [[] for _ in range(n)]
    errors: list[BaseException] = []
    ready = threading.Barrier(n)

    def typist(i: int) -> None:
        try:
            with WorkerClient(endpoint, timeout_s=600) as client:
                cursor = 15_000 + i * span
                doc = Document(tok, text, cursor, context_tokens)
                suffix_from = cursor + n_keys
                _keystroke(client, tok, doc.prompt(suffix_from), max_new_tokens)  # warm-up: the cold prefill
                ready.wait()
                for ch in text[cursor:cursor + n_keys]:
                    doc.typed += ch
                    results[i].append(_keystroke(client, tok, doc.prompt(suffix_from), max_new_tokens)[0])
        except BaseException as e:  # reported after the join
            errors.append(e)
            ready.abort()

    threads = [threading.Thread(target=typist, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [k for r in results for k in r]


def _model_dir(out_dir: Path, model_dir: str | Path | None, preset: str, seed: int) -> Path:
    if model_dir is not None:
        return Path(model_dir)
    from codefill.model.tiny import build_tiny_model_dir

    path = out_dir / f"model-{preset}-random-{seed}"
    if not (path / "config.json").is_file():
        # A 4k-piece tokenizer: the output head then costs about what an 8B-token vocabulary's share of a
        # small model would, and the stdlib training text is large enough for it.
        build_tiny_model_dir(path, preset, seed, vocab_size=4096, overwrite=True)
    return path


def run(out_dir: str | Path, model_dir: str | Path | None = None, preset: str = "small", *, seed: int = 0,
        context_tokens: int = 1500, max_new_tokens: int = 24, keystrokes: int = 40, cold_keystrokes: int = 10,
        accept_keystrokes: int = 16, typists: tuple[int, ...] = (4, 8), typist_keystrokes: int = 10,
        max_batch: int = 8, max_seq_len: int = 2048, device: str = "cpu") -> dict:
    from codefill.inference_workers.client import WorkerClient
    from codefill.inference_workers.startup import spawn_worker, stop_worker
    from codefill.inference_workers.engine import EngineConfig
    from codefill.model.checkpoint import load_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = _model_dir(out_dir, model_dir, preset, seed)
    tok = load_tokenizer(model_dir)
    source = Path(sysconfig.get_paths()["stdlib"]) / SOURCE_FILE
    text = source.read_text()
    cursor = 12_000  # well inside the file: a full context on both sides
    configs = {
        "full": EngineConfig(prefix_reuse=True, inflight_extension=True),
        "reuse": EngineConfig(prefix_reuse=True, inflight_extension=False),
        "cold": EngineConfig(prefix_reuse=False, inflight_extension=False),
    }
    report: dict = {
        "model_dir": str(model_dir), "preset": preset, "source": source_name(), "context_tokens": context_tokens,
        "max_new_tokens": max_new_tokens, "max_batch": max_batch, "max_seq_len": max_seq_len,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "keystroke_replay": {},
    }
    raw: dict[str, list[Keystroke]] = {}  # every keystroke, for the chart
    for name, engine in configs.items():
        process, endpoint = spawn_worker(model_dir, max_seq_len=max_seq_len, max_batch=max_batch, engine=engine,
                                         device=device, timeout_s=600)
        try:
            with WorkerClient(endpoint, timeout_s=600) as client:
                n = cold_keystrokes if name == "cold" else keystrokes
                raw[name] = _type_file(client, tok, text, cursor, n, context_tokens, max_new_tokens)
                report["keystroke_replay"][name] = _summary(raw[name])
                if name != "cold":
                    raw[f"{name}-accept"] = _type_suggestions(client, tok, text, cursor, accept_keystrokes,
                                                              context_tokens, max_new_tokens)
                    report["keystroke_replay"][f"{name}-accept"] = _summary(raw[f"{name}-accept"])
            if name == "full":
                single = report["keystroke_replay"]["full"]["complete_ms_p50"]
                report["typists"] = {"single_complete_ms_p50": single}
                for n_typists in typists:
                    raw[f"{n_typists} typists"] = _typists(endpoint, tok, text, n_typists, typist_keystrokes,
                                                           context_tokens, max_new_tokens)
                    s = _summary(raw[f"{n_typists} typists"])
                    s["p95_over_single_p50"] = round(s["complete_ms_p95"] / single, 2)
                    report["typists"][str(n_typists)] = s
        finally:
            stop_worker(process)
    replay = report["keystroke_replay"]
    report["cost_ratio_cold_over_keystroke_ttft"] = round(replay["cold"]["ttft_ms_p50"] / replay["full"]["ttft_ms_p50"],
                                                          1)
    report["latency_chart"] = latency_chart(out_dir / "workers_latency.png", {
        "time to first token": {name: [k.ttft_s * 1000 for k in ks] for name, ks in raw.items()},
        "complete suggestion": {name: [k.complete_s * 1000 for k in ks] for name, ks in raw.items()},
    }, title=f"Keystroke latency, {Path(model_dir).name} ({preset})").name
    (out_dir / "workers.json").write_text(json.dumps(report, indent=2))
    (out_dir / "workers.md").write_text(_markdown(report))
    return report


def _markdown(r: dict) -> str:
    lines = [
        "# Serving engine benchmark (`codefill bench workers`)", "",
        f"Model {r['model_dir']} (preset {r['preset']}, random weights unless given), {r['max_batch']} slots x "
        f"{r['max_seq_len']} positions, SPM prompts of ~{r['context_tokens']} tokens from {r['source']}, "
        f"suggestions of at most {r['max_new_tokens']} tokens or one line. Machine: {r['machine']}.", "",
        "## (b) Keystroke replay", "",
        "| worker | keystrokes | TTFT p50 ms | TTFT p95 ms | complete p50 ms | complete p95 ms | prompt reused | "
        "tokens replayed |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in r["keystroke_replay"].items():
        lines.append(f"| {name} | {s['n']} | {s['ttft_ms_p50']} | {s['ttft_ms_p95']} | {s['complete_ms_p50']} | "
                     f"{s['complete_ms_p95']} | {s['reused_fraction_mean']:.1%} | {s['replayed_tokens_total']} |")
    lines += ["", f"Cost of a keystroke vs a cold prefill of the same prompt (TTFT p50 cold / full): "
              f"**{r['cost_ratio_cold_over_keystroke_ttft']}x** (target >= 10x).", "",
              "`full`: prefix reuse + in-flight extension; `reuse`: prefix reuse only; `cold`: neither. "
              "`-accept`: the typist accepts the model's own suggestion, one token's text per keystroke.", "",
              "## (c) Concurrent typists (full worker)", "",
              f"Single typist complete p50: {r['typists']['single_complete_ms_p50']} ms.", "",
              "| typists | keystrokes | TTFT p95 ms | complete p50 ms | complete p95 ms | p95 / single p50 |",
              "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n, s in r["typists"].items():
        if n.isdigit():
            lines.append(f"| {n} | {s['n']} | {s['ttft_ms_p95']} | {s['complete_ms_p50']} | {s['complete_ms_p95']} "
                         f"| {s['p95_over_single_p50']}x |")
    lines += ["", "Target: 8 typists p95 <= 2x the single-typist p50.", ""]
    if r.get("latency_chart"):
        lines += chart_link(r["latency_chart"], "every keystroke of every worker and typist run")
    return "\n".join(lines)
