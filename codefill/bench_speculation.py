"""`codefill bench speculation`: what prompt-lookup speculation (engine._draft) buys a suggestion.

On the bundled model (or --model), cuts of real standard-library code at the start of a line (the last
`PROMPT` tokens before the cut), each completed with `TOKENS` greedy tokens by an in-process engine twice:
speculation off, and on (`EngineConfig.speculate`). Reports the drafted and accepted ids, the engine steps
(model calls) and the tokens per step, the wall time of each suggestion (median, p90), and checks the
outputs are equal token for token. One engine per mode serves every cut, as in a worker, so its speculation
gate (speculation_gate.py) decides from what it measured on the earlier ones. Writes `speculation.json` and `speculation.md` to out_dir.
"""

from __future__ import annotations

import json
import statistics
import sysconfig
import time
from pathlib import Path

FILES = ("argparse.py", "textwrap.py", "dataclasses.py", "json/encoder.py", "csv.py", "typing.py",
         "logging/__init__.py", "pathlib.py", "subprocess.py", "inspect.py")
CUTS, PROMPT, TOKENS, SPECULATE = (0.2, 0.4, 0.6), 700, 24, 4


def _cuts(tok) -> list[list[int]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in FILES:
        path = stdlib / name
        if not path.is_file():
            continue
        text = path.read_text()
        for cut in CUTS:
            end = text.index("\n", int(len(text) * cut)) + 1
            out.append(tok.encode(text[:end], bos=True)[-PROMPT:])
    return out


def _engine(runner, token_bytes, speculate):
    """An engine as a worker holds it (its speculation gate learns across requests) and its message log."""
    from codefill.inference_workers.engine import Engine, EngineConfig

    log: list = []
    return Engine(runner, EngineConfig(speculate=speculate), token_bytes, lambda identity, msg: log.append(msg)), log


def _suggest(runner, engine, log, prompt) -> tuple[list[int], float, dict]:
    from codefill.inference_workers.protocol import GenerateRequest, Token

    log.clear()
    drafted, accepted = engine.drafted, engine.accepted
    steps = {"n": 0}
    decode, verify = runner.decode_step, runner.verify

    def counted(f):
        def call(*a, **k):
            steps["n"] += 1
            return f(*a, **k)
        return call

    runner.decode_step, runner.verify = counted(decode), counted(verify)
    try:
        t = time.perf_counter()
        engine.submit(b"c", GenerateRequest("r", prompt, TOKENS))
        engine.run_until_idle()
        wall = time.perf_counter() - t
    finally:
        runner.decode_step, runner.verify = decode, verify
    tokens = [m.token_id for m in log if isinstance(m, Token)]
    return tokens, wall, {"steps": steps["n"], "drafted": engine.drafted - drafted,
                          "accepted": engine.accepted - accepted}


def run(out_dir: str | Path, model_dir: str | Path | None = None) -> dict:
    from codefill.bundled import bundled_model_dir
    from codefill.inference_workers.runner import Runner
    from codefill.inference_workers.stops import token_bytes_of_model_dir
    from codefill.model.checkpoint import load_tokenizer

    model_dir = Path(model_dir) if model_dir else bundled_model_dir()
    runner = Runner.from_model_dir(model_dir, max_seq_len=PROMPT + TOKENS + SPECULATE + 8, max_batch=2)
    token_bytes = token_bytes_of_model_dir(model_dir)
    prompts = _cuts(load_tokenizer(model_dir))
    _suggest(runner, *_engine(runner, token_bytes, SPECULATE), prompts[0])  # compile every graph first
    modes: dict[str, dict] = {}
    for speculate in (0, SPECULATE):
        walls, steps, drafted, accepted, outputs = [], 0, 0, 0, []
        engine, log = _engine(runner, token_bytes, speculate)
        for prompt in prompts:
            runner.prefill([1], 0, 0), runner.prefill([1], 1, 0)  # no prefix left over from the other mode
            tokens, wall, c = _suggest(runner, engine, log, prompt)
            walls.append(wall * 1000)
            steps, drafted, accepted = steps + c["steps"], drafted + c["drafted"], accepted + c["accepted"]
            outputs.append(tokens)
        n_tokens = sum(len(t) for t in outputs)
        modes[str(speculate)] = {"suggestion_ms_p50": statistics.median(walls),
                                 "suggestion_ms_p90": sorted(walls)[int(0.9 * (len(walls) - 1))],
                                 "decode_steps": steps, "tokens": n_tokens, "tokens_per_step": n_tokens / max(steps, 1),
                                 "drafted": drafted, "accepted": accepted, "outputs": outputs}
    same = modes["0"]["outputs"] == modes[str(SPECULATE)]["outputs"]
    report = {"model": str(model_dir), "prompts": len(prompts), "prompt_tokens": PROMPT, "new_tokens": TOKENS,
              "speculate": SPECULATE, "identical_outputs": same,
              "modes": {k: {f: v for f, v in m.items() if f != "outputs"} for k, m in modes.items()}}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speculation.json").write_text(json.dumps(report, indent=2))
    (out / "speculation.md").write_text(_markdown(report))
    return report


def _markdown(r: dict) -> str:
    off, on = r["modes"]["0"], r["modes"][str(r["speculate"])]
    lines = [f"# Prompt-lookup speculation: {Path(r['model']).name}", "",
             f"{r['prompts']} cuts of standard-library files (the last {r['prompt_tokens']} tokens before a line "
             f"start), {r['new_tokens']} greedy tokens each, one request at a time, in-process engine. "
             f"Outputs identical token for token: {'yes' if r['identical_outputs'] else 'NO'}.", "",
             "| speculation | suggestion p50 (ms) | p90 (ms) | model steps | tokens per step | drafted | accepted |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, m in (("off", off), (f"up to {r['speculate']} drafted ids", on)):
        lines.append(f"| {name} | {m['suggestion_ms_p50']:.1f} | {m['suggestion_ms_p90']:.1f} | {m['decode_steps']} | "
                     f"{m['tokens_per_step']:.2f} | {m['drafted']} | {m['accepted']} |")
    return "\n".join(lines) + "\n"
