"""Evaluating through running workers (`codefill eval ... --endpoint E`) instead of an in-process model.

A model too big for one process (Code Llama 34B on tensor-parallel ranks, `codefill workers --tp N`) is measured
where it is served: the evaluation tokenizes with the MODEL_DIR's tokenizer (workers see token ids only, as with
the language server), sends each prompt as a GenerateRequest and reads the tokens back. The answers are the same
tokens the in-process Runner gives (the engine's tests check that), so the two paths score alike.

    fim_complete(client)                      -> training.fim_eval.Complete (ids -> ids), for infilling
    text_complete(client, tok, config, ...)   -> humaneval.Complete (prompt text, seed -> completion text);
                                                 sampling per sample seed, and HumanEval's stop sequences as the
                                                 worker's text stop rules (the text is cut again by `truncate`)
    context(client, tok)                      -> the worker's context (Pong.max_seq_len), after checking that
                                                 it serves a model with this tokenizer's vocabulary (EvalError)
"""

from __future__ import annotations

from .eval_error import EvalError


def connect(endpoint: str, timeout_s: float = 600.0):
    from codefill.inference_workers.client import WorkerClient, WorkerError

    try:
        client = WorkerClient(endpoint, timeout_s=timeout_s)
        pong = client.ping()
    except WorkerError as e:
        raise EvalError(f"cannot reach workers at {endpoint}: {e}") from e
    if not pong.ready:
        client.close()
        raise EvalError(f"the workers at {endpoint} are not ready: {pong.reason or 'starting'}")
    return client


def context(client, tok) -> int:
    """The worker's context, after a one-token probe that the vocabulary's last id is valid there."""
    from codefill.inference_workers.client import WorkerError

    try:
        client.complete([tok.bos_id, tok.vocab_size - 1], 1)
    except WorkerError as e:
        raise EvalError(f"the workers at {client.endpoint} refuse token id {tok.vocab_size - 1}: they serve a "
                        f"model with another vocabulary than this tokenizer's ({tok.vocab_size}): {e}") from e
    return client.ping().max_seq_len


def fim_complete(client):
    from codefill.inference_workers.client import StopRules

    def complete(prompt: list[int], max_new_tokens: int, stop_ids: frozenset[int], min_new_tokens: int) -> list[int]:
        tokens, _ = client.complete(prompt, max_new_tokens, None, sorted(stop_ids),
                                    rules=StopRules(min_new_tokens=min_new_tokens))
        return [t.token_id for t in tokens]

    return complete


def text_complete(client, tok, config, max_seq_len: int):
    from codefill.inference_workers.client import StopRules
    from codefill.model.sampling import SamplingConfig

    from .humaneval import STOP_SEQUENCES, PromptTooLong, decode_continuation

    top_p = config.top_p if config.temperature > 0 else 1.0
    rules = StopRules(stop_strings=STOP_SEQUENCES)

    def complete(prompt: str, seed: int) -> str:
        ids = tok.encode(prompt, bos=True)
        max_new = min(config.max_new_tokens, max_seq_len - len(ids) + 1)
        if max_new < 1:
            raise PromptTooLong(f"prompt of {len(ids)} tokens does not fit the workers' context of {max_seq_len}")
        sampling = SamplingConfig(temperature=config.temperature, top_p=top_p, seed=seed)
        tokens, _ = client.complete(ids, max_new, sampling, [tok.eos_id], rules=rules)
        return decode_continuation(tok, [t.token_id for t in tokens if t.token_id != tok.eos_id])

    return complete
