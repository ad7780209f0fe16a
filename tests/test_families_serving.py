"""A Qwen2.5-Coder MODEL_DIR served end to end: the language server started as the CLI starts it (spawning its
own worker) reads the family from the MODEL_DIR, so it tokenizes with tokenizer.json and writes Qwen's
repository-level FIM prompt; the completion it shows must equal the in-process path (lsp/prompt.py's prompt,
the Runner's greedy tokens up to the family's stop ids, decoded, passed through postprocess `fit`).
"""

from __future__ import annotations

import pytest
import pytest_asyncio

from codefill.inference_workers.runner import Runner
from codefill.lsp.postprocess import fit
from codefill.lsp.prompt import Chunk, PromptConfig, build_prompt
from codefill.model.checkpoint import load_tokenizer
from codefill.model.convert import hf_to_model_dir
from codefill.model.fim import decode_middle, infilling_prompt_tokens, repository_prompt_tokens
from codefill.model.sampling import SamplingConfig
from helpers import FIXED_CORPUS, make_family_hf_dir
from test_lsp_e2e import MAX_NEW, MAX_SEQ_LEN, SERVER, inline, open_doc, split, start

pytest.importorskip("transformers")

DOCS = ['def fibonacci(n: int) -> int:\n    if n < 2:\n        return |\n    return 0\n',
        'import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n        |\n',
        'class Point:\n    def __init__(self, x, y):\n        self.x = |\n']


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-serve")
    return hf_to_model_dir(make_family_hf_dir(root / "hf", "qwen2.5-coder", seed=7), root / "model")


def test_prompt_uses_repository_layout_within_budget(qwen_dir):
    tok = load_tokenizer(qwen_dir)
    chunks = [Chunk("lib/a.py", FIXED_CORPUS[:600]), Chunk("lib/b.py", FIXED_CORPUS[600:1500])]
    prefix, suffix = FIXED_CORPUS[:2000], FIXED_CORPUS[2000:]
    for budget in (120, 300, 700, 4000):
        p = build_prompt(tok, prefix, suffix, PromptConfig(max_prompt_tokens=budget), path="main.py",
                         language_id="python", chunks=chunks)
        assert len(p.ids) <= budget
        assert prefix.endswith(p.prefix) and suffix.startswith(p.suffix)
        files = [(c.path, c.text) for c in chunks[:p.n_chunks]]
        if p.context:
            assert p.ids == repository_prompt_tokens(tok, "workspace", files, "main.py", p.prefix, p.suffix)
        else:
            assert p.ids == infilling_prompt_tokens(tok, p.prefix, p.suffix)
        if budget == 4000:
            assert p.n_chunks == 2 and p.ids[0] == tok.piece_to_id("<|repo_name|>")
    # No path and no chunks: the plain FIM prompt.
    assert build_prompt(tok, "x = ", "\n").ids == infilling_prompt_tokens(tok, "x = ", "\n")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(qwen_dir):
    client = await start(SERVER + ["--model", str(qwen_dir), "--worker-max-seq-len", str(MAX_SEQ_LEN)])
    yield client
    await client.shutdown_session()


@pytest.mark.asyncio(loop_scope="module")
async def test_lsp_completion_on_qwen_equals_in_process_path(client, qwen_dir):
    tok = load_tokenizer(qwen_dir)
    gen = Runner.from_model_dir(qwen_dir, max_seq_len=MAX_SEQ_LEN, max_batch=1)
    config = PromptConfig(max_prompt_tokens=min(PromptConfig().max_prompt_tokens, MAX_SEQ_LEN - MAX_NEW + 1))
    shown = 0
    for i, marked in enumerate(DOCS):
        text, prefix, line, char16, _ = split(marked)
        path = f"/work/doc{i}.py"
        ids = build_prompt(tok, prefix, text[len(prefix):], config, path=path, language_id="python").ids
        assert ids[0] == tok.piece_to_id("<|repo_name|>")  # the path makes it a repository-level prompt
        out = gen.generate(ids, MAX_NEW, SamplingConfig(), stop_ids=frozenset(tok.stop_ids))
        fitted = fit(prefix, text[len(prefix):], decode_middle(tok, [t for t, _ in out]))
        expected = [] if fitted is None else [fitted.text]
        open_doc(client, "file://" + path, text)
        result = await inline(client, "file://" + path, line, char16)
        assert [item.insert_text for item in result.items] == expected, marked
        shown += bool(expected)
    assert shown, "the random model should show a completion for at least one document"


def test_cli_convert_then_infill_deepseek(tmp_path):
    """`codefill convert` then `codefill infill` as a user runs them, on a DeepSeek-Coder checkpoint: the ids are
    the in-process greedy ids of the family's FIM prompt, ending at one of its stop ids."""
    import json

    from helpers import run_codefill

    hf_dir = make_family_hf_dir(tmp_path / "hf", "deepseek-coder", seed=2)
    run_codefill("convert", "--from-hf", hf_dir, "--output", tmp_path / "model")
    tok = load_tokenizer(tmp_path / "model")
    prefix, suffix = "def area(r):\n    return ", "\n\nprint(area(2))\n"
    done = run_codefill("infill", "--model", tmp_path / "model", "--prefix", prefix, "--suffix", suffix,
                        "--max-new-tokens", "12", "--json")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    prompt = infilling_prompt_tokens(tok, prefix, suffix)
    gen = Runner.from_model_dir(tmp_path / "model", max_seq_len=len(prompt) + 12, max_batch=1)  # as the CLI sizes it
    assert prompt[:2] == [tok.piece_to_id("<｜begin▁of▁sentence｜>"), tok.piece_to_id("<｜fim▁begin｜>")]
    expected = [t for t, _ in gen.generate(prompt, 12, SamplingConfig(), stop_ids=frozenset(tok.stop_ids))]
    assert out["ids"] == expected
    assert out["text"] == decode_middle(tok, expected)


def test_http_infill_with_extra_files_on_qwen(qwen_dir, tmp_path):
    """llama.vim's /infill body (with an `input_extra` file) against `codefill http` on the Qwen MODEL_DIR: the
    answer is the in-process middle of the repository-level prompt the language server's code builds."""
    from codefill.lsp.completion import Completer
    from codefill.lsp.settings import Settings
    from codefill.model.fim import cut_middle
    from http_helpers import post, running_http
    from test_http_e2e import LLAMA_VIM, MAX_SEQ_LEN as HTTP_SEQ, SUFFIX as HTTP_SUFFIX

    tok = load_tokenizer(qwen_dir)
    completer = Completer(tok)
    extra = LLAMA_VIM["input_extra"][0]
    plan = completer.plan(HTTP_SEQ, Settings(), LLAMA_VIM["input_prefix"] + LLAMA_VIM["prompt"], HTTP_SUFFIX,
                          path=None, language_id=None, chunks=[Chunk(extra["filename"], extra["text"])], max_new=24)
    assert plan.prompt.ids[0] == tok.piece_to_id("<|repo_name|>") and plan.prompt.n_chunks == 1
    gen = Runner.from_model_dir(qwen_dir, max_seq_len=HTTP_SEQ, max_batch=1)
    out = gen.generate(plan.prompt.ids, 24, SamplingConfig(), stop_ids=frozenset(completer.stop_ids))
    expected = tok.decode_infilling(cut_middle(tok, [t for t, _ in out])[0])
    with running_http(qwen_dir, tmp_path / "http.log", "--worker-max-seq-len", str(HTTP_SEQ)) as url:
        status, res = post(url + "/infill", LLAMA_VIM)
    assert status == 200, res
    assert expected and res["content"] == expected
