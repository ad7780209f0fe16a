"""Qwen2.5-Coder and DeepSeek-Coder end to end, on random-weight checkpoints written by transformers' own
`Qwen2ForCausalLM` and `LlamaForCausalLM` (linear rope scaling, factor 4) with byte-level BPE tokenizers
trained here (tests/helpers.py):

- conversion: the family read from the checkpoint, the config's keys refused by name, HF -> MODEL_DIR -> HF
  bit for bit (a tied head written back as a tie);
- parity: prefill logits within 1e-4 of transformers, greedy tokens identical;
- tokenizer: the interface the rest of codefill uses, special tokens written as text stay text, the workers'
  byte table agrees with decoding;
- FIM layouts golden-tested against each family's published template, tokenized by transformers' tokenizer
  (which parses the special tokens out of the template text);
- tensor parallelism: TP=2 and TP=1 over real msrun ranks give the single-process tokens and logits, with the
  Qwen2 biases cut like their rows.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from codefill.inference_workers.runner import Runner  # noqa: E402
from codefill.inference_workers.stops import token_bytes_of_model_dir  # noqa: E402
from codefill.model.checkpoint import CheckpointError, load_model_dir, load_tokenizer  # noqa: E402
from codefill.model.config import ConfigError, LlamaConfig  # noqa: E402
from codefill.model.convert import hf_to_model_dir, model_dir_to_hf  # noqa: E402
from codefill.model.fim import cut_middle, infilling_prompt_tokens, repository_prompt_tokens  # noqa: E402
from codefill.model.safetensors_io import read_safetensors  # noqa: E402
from codefill.model.sampling import SamplingConfig  # noqa: E402
from helpers import family_hf_config, make_family_hf_dir  # noqa: E402

FAMILIES = ["qwen2.5-coder", "deepseek-coder"]
ATOL = 1e-4
PREFIX = 'def read_lines(path: str) -> List[str]:\n    with open(path, "r") as f:\n        return '
SUFFIX = "\n\n\ndef main(argv):\n    return 0\n"


@pytest.fixture(scope="module", params=FAMILIES)
def family_dirs(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    hf_dir = make_family_hf_dir(root / "hf", request.param, seed=3)
    model_dir = hf_to_model_dir(hf_dir, root / "model")
    return request.param, hf_dir, model_dir


@pytest.fixture(scope="module")
def hf_model(family_dirs):
    _, hf_dir, _ = family_dirs
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager",
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def runner(family_dirs):
    return Runner.from_model_dir(family_dirs[2], max_seq_len=128, max_batch=1)


def hf_tokenizer(hf_dir):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))


# --- config and conversion ----------------------------------------------------------------------------------


def test_conversion_reads_family_and_architecture(family_dirs):
    family, _, model_dir = family_dirs
    cfg = load_model_dir(model_dir).config
    assert cfg.family == family
    if family == "qwen2.5-coder":
        assert (cfg.attention_bias, cfg.tie_word_embeddings) == (True, True)
        assert (cfg.rope_theta, cfg.rope_scaling_factor) == (1e6, 1.0)
        assert (cfg.n_heads, cfg.n_kv_heads) == (8, 2)
    else:
        assert (cfg.attention_bias, cfg.tie_word_embeddings, cfg.rope_scaling_factor) == (False, False, 4.0)
    assert (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer.model").exists()


@pytest.mark.parametrize("family, overrides, named", [
    ("qwen2.5-coder", {"use_sliding_window": True}, "use_sliding_window=True"),
    ("qwen2.5-coder", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("qwen2.5-coder", {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
     "rope_scaling=.*yarn"),
    ("deepseek-coder", {"rope_scaling": {"type": "dynamic", "factor": 4.0}}, "rope_scaling=.*dynamic"),
    ("deepseek-coder", {"rope_scaling": {"type": "linear", "factor": "4"}}, "rope_scaling=.*factor"),
    ("deepseek-coder", {"attention_bias": True}, "attention_bias=True"),
    ("deepseek-coder", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}, "rope_scaling": None},
     "rope_parameters=.*llama3"),
])
def test_unimplemented_config_refused_naming_key_and_value(family, overrides, named):
    with pytest.raises(ConfigError, match=named):
        LlamaConfig.from_hf(family_hf_config(family, 512, **overrides), family=family)


def test_conversion_refuses_unimplemented_checkpoint_before_writing(tmp_path):
    hf_dir = make_family_hf_dir(tmp_path / "hf", "qwen2.5-coder")
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "use_sliding_window": True}))
    with pytest.raises(CheckpointError, match="use_sliding_window=True"):
        hf_to_model_dir(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_llama_checkpoint_with_unknown_tokenizer_refused(tmp_path):
    hf_dir = make_family_hf_dir(tmp_path / "hf", "qwen2.5-coder")  # Qwen's tokens under a llama config
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="no tokenizer.model or tokenizer.json of a known family for "
                                              "model_type 'llama'"):
        hf_to_model_dir(hf_dir, tmp_path / "out")


def test_round_trip_to_hf_is_bit_exact(family_dirs, tmp_path):
    family, hf_dir, model_dir = family_dirs
    back = model_dir_to_hf(model_dir, tmp_path / "back")
    theirs, ours = read_safetensors(hf_dir / "model.safetensors"), read_safetensors(back / "model.safetensors")
    assert sorted(theirs) == sorted(ours)  # the tied Qwen head is left out again, as published
    assert ("lm_head.weight" in ours) == (family == "deepseek-coder")
    for name in theirs:
        assert np.array_equal(np.asarray(theirs[name]), np.asarray(ours[name])), name
    assert (back / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    again = hf_to_model_dir(back, tmp_path / "again")
    assert load_model_dir(again).config == load_model_dir(model_dir).config
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back, attn_implementation="eager").eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    ids = torch.tensor([[5, 77, 300, 12, 9]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, original(ids).logits)


def test_untied_head_after_finetune_is_written_untied(family_dirs, tmp_path):
    family, _, model_dir = family_dirs
    if family != "qwen2.5-coder":
        pytest.skip("only Qwen2.5-Coder ties its embeddings")
    from codefill.model.checkpoint import save_model_dir

    files = load_model_dir(model_dir)
    weights = dict(files.weights)
    weights["output.weight"] = weights["output.weight"] + np.float32(0.01)  # what a full finetune does
    changed = save_model_dir(tmp_path / "tuned", files.config, weights, files.tokenizer_path)
    back = model_dir_to_hf(changed, tmp_path / "back")
    assert json.loads((back / "config.json").read_text())["tie_word_embeddings"] is False
    assert np.array_equal(read_safetensors(back / "model.safetensors")["lm_head.weight"], weights["output.weight"])


# --- parity with transformers -------------------------------------------------------------------------------


def test_prefill_logits_match_hf(family_dirs, hf_model, runner):
    family, hf_dir, model_dir = family_dirs
    tok = load_tokenizer(model_dir)
    prompt = infilling_prompt_tokens(tok, PREFIX, SUFFIX)
    prompt += np.random.default_rng(1).integers(0, 512, 90 - len(prompt)).tolist()  # padded ids too
    with torch.no_grad():
        ref = hf_model(torch.tensor([prompt]), use_cache=False).logits[0].numpy()
    assert np.abs(ref).max() > 1.0, "logits too flat for a meaningful comparison"
    for n in (len(prompt) // 3, 57, len(prompt)):  # past 32 positions rope scaling shows at factor 4
        np.testing.assert_allclose(runner.prefill(prompt[:n]), ref[n - 1], rtol=0, atol=ATOL, err_msg=f"length {n}")


def test_greedy_tokens_match_hf(family_dirs, hf_model, runner):
    _, _, model_dir = family_dirs
    prompt = infilling_prompt_tokens(load_tokenizer(model_dir), PREFIX, SUFFIX)
    # Greedy by the model's own forward, one token at a time. Not `generate()`: in transformers 5.25 its logits
    # on the linear-scaled Llama checkpoint differ (by ~0.5) from the same model's forward, cached or not.
    expected = []
    with torch.no_grad():
        for _ in range(30):
            logits = hf_model(torch.tensor([prompt + expected]), use_cache=False).logits[0, -1]
            expected.append(int(logits.argmax()))
    assert [t for t, _ in runner.generate(prompt, 30, SamplingConfig())] == expected


# --- tokenizer ------------------------------------------------------------------------------------------------


def test_tokenizer_matches_hf_tokenizer(family_dirs):
    _, hf_dir, model_dir = family_dirs
    tok, ref = load_tokenizer(model_dir), hf_tokenizer(hf_dir)
    for text in (PREFIX, SUFFIX, "    x = 1  # ünïcödé ☺ 字\n\t\r\n", ""):
        ids = tok.encode(text)
        assert ids == tok.encode_infilling(text) == ref.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == tok.decode_infilling(ids) == text
    assert tok.piece(tok.prefix_id) == tok.family.prefix


def test_special_tokens_written_as_text_stay_text(family_dirs):
    _, _, model_dir = family_dirs
    tok = load_tokenizer(model_dir)
    text = f"s = '{tok.family.prefix}{tok.family.eos}'"
    ids = tok.encode(text)
    assert not {tok.prefix_id, tok.eos_id} & set(ids)
    assert tok.decode(ids) == text


def test_worker_byte_table_agrees_with_decoding(family_dirs):
    _, _, model_dir = family_dirs
    tok, table = load_tokenizer(model_dir), token_bytes_of_model_dir(model_dir)
    assert len(table) == load_model_dir(model_dir).config.vocab_size == 512  # padded ids decode to nothing
    assert table[tok.eos_id] == table[tok.prefix_id] == b"" and table[-1] == b""
    for text in (PREFIX + SUFFIX, "naïve ☺ 字 \t\n"):
        ids = tok.encode(text)
        assert b"".join(table[i] for i in ids) == text.encode("utf-8")


def test_stop_ids_and_cut_middle(family_dirs):
    family, _, model_dir = family_dirs
    tok = load_tokenizer(model_dir)
    names = {"qwen2.5-coder": ["<|endoftext|>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>"],
             "deepseek-coder": ["<｜end▁of▁sentence｜>", "<|EOT|>"]}[family]
    assert [tok.piece(i) for i in tok.stop_ids] == names
    body = tok.encode("return x")
    for stop in tok.stop_ids:
        assert cut_middle(tok, body + [stop] + body) == (body, True)


# --- FIM layouts, golden against the published templates --------------------------------------------------------

TEMPLATES = {
    # Qwen2.5-Coder README, "file-level code completion (fill in the middle)"
    "qwen2.5-coder": "<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>",
    # DeepSeek-Coder README, "code insertion" (the tokenizer puts BOS first)
    "deepseek-coder": "<｜begin▁of▁sentence｜><｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>",
}


def test_fim_layout_matches_published_template(family_dirs):
    family, hf_dir, model_dir = family_dirs
    tok, ref = load_tokenizer(model_dir), hf_tokenizer(hf_dir)
    for prefix, suffix in ((PREFIX, SUFFIX), ("", ""), ("x = ", ""), ("", "\n")):
        expected = ref.encode(TEMPLATES[family].format(prefix=prefix, suffix=suffix), add_special_tokens=False)
        assert infilling_prompt_tokens(tok, prefix, suffix) == expected
        # Neither family was trained suffix-first: the language server's SPM default gives their PSM.
        assert infilling_prompt_tokens(tok, prefix, suffix, spm=True) == expected


def test_qwen_repository_layout_matches_published_template(family_dirs):
    family, hf_dir, model_dir = family_dirs
    tok = load_tokenizer(model_dir)
    if family != "qwen2.5-coder":
        with pytest.raises(Exception, match="no repository-level format"):
            repository_prompt_tokens(tok, "r", [], "a.py", "", "")
        return
    files = [("lib/points.py", "class Point:\n    pass\n"), ("README.md", "# words")]
    # Qwen2.5-Coder README / technical report, repository-level code completion
    text = ("<|repo_name|>words\n<|file_sep|>lib/points.py\nclass Point:\n    pass\n\n<|file_sep|>README.md\n# words\n"
            "<|file_sep|>main.py\n<|fim_prefix|>" + PREFIX + "<|fim_suffix|>" + SUFFIX + "<|fim_middle|>")
    expected = hf_tokenizer(hf_dir).encode(text, add_special_tokens=False)
    assert repository_prompt_tokens(tok, "words", files, "main.py", PREFIX, SUFFIX) == expected


def test_fim_layouts_pinned(family_dirs):
    """The markers' positions, pinned by id, for a prompt whose text is one token each side."""
    family, _, model_dir = family_dirs
    tok = load_tokenizer(model_dir)
    p, s = tok.encode("x"), tok.encode("y")
    head = [tok.piece_to_id("<｜begin▁of▁sentence｜>")] if family == "deepseek-coder" else []
    assert infilling_prompt_tokens(tok, "x", "y") == head + [tok.prefix_id] + p + [tok.suffix_id] + s + [tok.middle_id]
    assert [tok.piece(i) for i in (tok.prefix_id, tok.suffix_id, tok.middle_id)] == {
        "qwen2.5-coder": ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"],
        "deepseek-coder": ["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"]}[family]


# --- tensor parallelism ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-tp")
    return hf_to_model_dir(make_family_hf_dir(root / "hf", "qwen2.5-coder", seed=5), root / "model")


def test_qwen_biases_split_like_their_rows_and_merge_back(qwen_dir, tmp_path):
    from codefill.inference_workers import sharding as tp

    split = tp.split_model_dir(qwen_dir, 2, tmp_path / "tp2")
    full = load_model_dir(qwen_dir).weights
    _, rank1 = tp.load_rank_weights(split, 1, 2)
    for name, rows in (("wq", 32), ("wk", 8), ("wv", 8)):  # 8 query / 2 KV heads of 8 dims: half per rank
        bias, weight = f"layers.1.attention.{name}.bias", f"layers.1.attention.{name}.weight"
        assert np.array_equal(rank1[bias], full[bias][rows:]) and np.array_equal(rank1[weight], full[weight][rows:])
    assert tp.load_tokenizer(split).encode(PREFIX) == load_tokenizer(qwen_dir).encode(PREFIX)
    merged = load_model_dir(tp.merge_split_dir(split, tmp_path / "merged")).weights
    assert all(np.array_equal(merged[n], full[n]) for n in full)


def test_qwen_tp2_and_tp1_equal_single_process(qwen_dir, tmp_path):
    from test_tp import MAX_BATCH, MAX_SEQ_LEN, NEW_TOKENS, PROMPT, run_driver

    single = Runner.from_model_dir(qwen_dir, max_seq_len=MAX_SEQ_LEN, max_batch=MAX_BATCH)
    first_logits = single.prefill(PROMPT, slot=0, start_pos=0)
    tokens = [t for t, _ in single.generate(PROMPT, NEW_TOKENS)]
    tp1 = run_driver(qwen_dir, 1, tmp_path / "tp1.npz")
    tp2 = run_driver(qwen_dir, 2, tmp_path / "tp2.npz")
    assert tp1["greedy_tokens"].tolist() == tp2["greedy_tokens"].tolist() == tokens
    np.testing.assert_allclose(tp2["greedy_logits"], tp1["greedy_logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(tp2["greedy_logits"][0], first_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(tp2["reuse_logits"], tp2["cold_logits"], atol=1e-5, rtol=0)


def test_padding_ids_decode_to_nothing(family_dirs):
    """The checkpoint's vocabulary (512) is wider than the tokenizer's tokens (400), as Qwen's is: a model can
    emit a padding id, which decodes to nothing rather than failing the request."""
    _, _, model_dir = family_dirs
    tok = load_tokenizer(model_dir)
    assert tok.n_tokens == 400 and tok.vocab_size == 512
    body = tok.encode("x = 1")
    assert tok.decode_infilling(body[:1] + [450, 511] + body[1:]) == "x = 1"
    with pytest.raises(Exception, match=r"outside the vocabulary \[0, 512\)"):
        tok.decode([512])


def test_http_reads_the_family_template_continue_writes(family_dirs):
    """Continue renders its own FIM template for these families into `prompt` (its templates for Qwen and
    DeepSeek models); the HTTP server reads prefix and suffix back out with the served family's markers."""
    from codefill.http_api.fim_text import split_fim_text

    family, _, model_dir = family_dirs
    tok = load_tokenizer(model_dir)
    template = {"qwen2.5-coder": "<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>",
                "deepseek-coder": "<｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>"}[family]
    assert split_fim_text(tok, template.format(prefix=PREFIX, suffix=SUFFIX)) == (PREFIX, SUFFIX)
    assert split_fim_text(tok, PREFIX) is None  # no markers: a plain prefix
