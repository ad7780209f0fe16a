"""An msrun rank script for tests/test_tp.py: rank 0 drives the runner directly (no sockets)
through a fixed set of steps and saves every logits array to --out (.npz); the other ranks follow.

    msrun ... tests/tp_driver.py --model DIR --tp 2 --out OUT.npz --prompt 1,17,42 --new-tokens 8
"""

from __future__ import annotations

import argparse

import numpy as np

from codefill.inference_workers.engine import Engine, EngineConfig
from codefill.inference_workers.protocol import GenerateRequest, Token
from codefill.inference_workers.ranks import open_rank
from codefill.inference_workers.stops import token_bytes_of_model_dir


def greedy(runner, prompt: list[int], n: int, slot: int = 0) -> tuple[list[int], list[np.ndarray]]:
    """n greedy tokens in `slot` with every other slot idle: (tokens, logits before each token)."""
    logits = runner.prefill(prompt, slot, 0)
    tokens, seen = [], [logits]
    step_tokens = [0] * runner.max_batch
    positions = [runner.idle_position] * runner.max_batch
    positions[slot] = len(prompt)
    for i in range(n):
        tokens.append(int(np.argmax(logits)))
        if i == n - 1:
            break
        step_tokens[slot] = tokens[-1]
        logits = runner.decode_step(step_tokens, positions)[slot]
        seen.append(logits)
        positions[slot] += 1
    return tokens, seen


def engine_tokens(runner, model_dir: str, prompts: list[list[int]], n: int, speculate: int):
    """Greedy tokens of each prompt in turn through one engine (so later prompts reuse earlier slots and
    extend their decodes in flight), and its (drafted, accepted) counts."""
    log: list = []
    engine = Engine(runner, EngineConfig(speculate=speculate), token_bytes_of_model_dir(model_dir),
                    lambda identity, msg: log.append(msg))
    out = []
    for i, prompt in enumerate(prompts):
        log.clear()
        engine.submit(b"c", GenerateRequest(f"r{i}", prompt, n))
        engine.run_until_idle()
        out.append([m.token_id for m in log if isinstance(m, Token)])
    return out, (engine.drafted, engine.accepted)


def speculation(runner, model_dir: str, prompt: list[int], out: dict[str, np.ndarray]) -> None:
    """The same requests with prompt-lookup speculation off and on: a prompt that repeats itself (so drafts
    are found), then a prompt extending it by its own first tokens (prefix reuse, in-flight extension)."""
    looped = (prompt * 4)[:40]
    for speculate in (0, 4):
        first, _ = engine_tokens(runner, model_dir, [looped], 12, speculate)
        tokens, counts = engine_tokens(runner, model_dir, [looped, looped + first[0][:5]], 12, speculate)
        out[f"spec{speculate}_tokens"] = np.array(tokens)
        out[f"spec{speculate}_counts"] = np.array(counts)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--max-batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    runner = open_rank(args.model, args.tp, max_seq_len=args.max_seq_len, max_batch=args.max_batch,
                       threads=args.threads)
    if runner is None:
        return
    prompt = [int(x) for x in args.prompt.split(",")]
    out: dict[str, np.ndarray] = {}
    try:
        tokens, logits = greedy(runner, prompt, args.new_tokens, slot=0)
        out["greedy_tokens"] = np.array(tokens)
        out["greedy_logits"] = np.stack(logits)
        # Prefix reuse in slot 1: the first k tokens, then the rest from start_pos k, must equal a cold prefill.
        k = len(prompt) // 2
        runner.prefill(prompt[:k], 1, 0)
        out["reuse_logits"] = runner.prefill(prompt[k:], 1, k)
        out["cold_logits"] = runner.prefill(prompt, 1, 0)
        # Rollback: overwrite slot 1 from position k with other tokens, then return to the prompt's tail.
        runner.prefill([3] * (len(prompt) - k + 3), 1, k)
        out["rollback_logits"] = runner.prefill(prompt[k:], 1, k)
        speculation(runner, args.model, prompt, out)
        graphs = runner.compiled_graphs()
        out["graphs"] = np.array([graphs["prefill"], graphs["decode"]])
    finally:
        runner.close()
    np.savez(args.out, **out)


if __name__ == "__main__":
    main()
