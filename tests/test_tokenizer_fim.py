"""Golden tests for the tokenizer and Code Llama infilling prompts.

The expected id lists were computed once with the tokenizer trained from helpers.FIXED_CORPUS (600 pieces,
sentencepiece 0.2.x) and pasted here. If sentencepiece changes its BPE trainer they will need recomputing;
the structural tests below (markers, no leading space, determinism) do not depend on the numbers.
Ids in this vocabulary: unk 0, bos 1, eos 2, <PRE> 3, <SUF> 4, <MID> 5, <EOT> 6, "▁" 540, "<0x0A>" 17.
"""

from __future__ import annotations

import pytest
from helpers import FIXED_CORPUS, train_test_tokenizer

from codefill.model.fim import cut_middle, decode_middle, infilling_prompt_tokens
from codefill.model.tokenizer import INFILLING_PIECES, Tokenizer, TokenizerError
from codefill.model.tokenizer_training import train_sentencepiece


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return train_test_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture(scope="module")
def tok(tok_path):
    return Tokenizer(tok_path)


# (prefix, suffix, PSM ids, SPM ids)
GOLDEN = [
    pytest.param(
        "def fibonacci(n: int) -> int:\n    ", "\n    return b\n",
        [1, 3, 309, 335, 504, 471, 554, 542, 550, 317, 555, 291, 317, 550, 17, 264, 4, 17, 264, 280, 314, 17, 5],
        [1, 3, 4, 17, 264, 280, 314, 17, 5, 309, 335, 504, 471, 554, 542, 550, 317, 555, 291, 317, 550, 17, 264],
        id="suffix-starts-with-newline"),
    pytest.param(
        "    result = ", "  # the answer\n",
        [1, 3, 265, 420, 275, 540, 4, 263, 42, 523, 540, 343, 546, 572, 311, 17, 5],
        [1, 3, 4, 263, 42, 523, 540, 343, 546, 572, 311, 17, 5, 265, 420, 275, 540],
        id="suffix-starts-with-spaces"),
    pytest.param(
        "for word in ", "line.split():",
        [1, 3, 516, 419, 271, 540, 4, 297, 561, 528, 462, 5],
        [1, 3, 4, 297, 561, 528, 462, 5, 516, 419, 271, 540],
        id="suffix-starts-with-identifier"),
    pytest.param("", "return None", [1, 3, 4, 280, 414, 5], [1, 3, 4, 280, 414, 5], id="empty-prefix"),
    pytest.param("print(", "", [1, 3, 540, 369, 554, 4, 5], [1, 3, 4, 5, 540, 369, 554], id="empty-suffix"),
    pytest.param("", "", [1, 3, 4, 5], [1, 3, 4, 5], id="both-empty"),
    pytest.param(
        's = "héllo"  # ☺ ', " 世界\n",
        [1, 3, 396, 275, 351, 566, 202, 176, 552, 348, 553, 263, 42, 540, 233, 159, 193, 540, 4,
         540, 235, 191, 157, 238, 156, 147, 17, 5],
        [1, 3, 4, 540, 235, 191, 157, 238, 156, 147, 17, 5,
         396, 275, 351, 566, 202, 176, 552, 348, 553, 263, 42, 540, 233, 159, 193, 540],
        id="unicode-byte-fallback"),
]


@pytest.mark.parametrize("prefix, suffix, psm, spm", GOLDEN)
def test_infilling_prompts_golden(tok, prefix, suffix, psm, spm):
    assert infilling_prompt_tokens(tok, prefix, suffix) == psm
    assert infilling_prompt_tokens(tok, prefix, suffix, spm=True) == spm


@pytest.mark.parametrize("prefix, suffix, psm, spm", GOLDEN)
def test_prompt_layout_matches_meta(tok, prefix, suffix, psm, spm):
    # Meta's rule, spelled out: prefix through encode (leading space), suffix through encode_infilling.
    pre, suf = tok.encode(prefix), tok.encode_infilling(suffix)
    assert psm == [tok.bos_id, tok.prefix_id] + pre + [tok.suffix_id] + suf + [tok.middle_id]
    assert spm == [tok.bos_id, tok.prefix_id, tok.suffix_id] + suf + [tok.middle_id] + pre
    # The markers occur once each: nothing in the text produced one.
    for ids in (psm, spm):
        assert [ids.count(i) for i in (tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id)] == [1, 1, 1, 0]


def test_special_ids_are_the_pieces(tok):
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    sp_ids = {name: tok.piece_to_id(piece) for name, piece in INFILLING_PIECES.items()}
    assert sp_ids == {"prefix": tok.prefix_id, "suffix": tok.suffix_id, "middle": tok.middle_id, "eot": tok.eot_id}
    assert [tok.piece(i) for i in sp_ids.values()] == ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"]
    assert tok.vocab_size == 600


def test_encode_golden(tok):
    assert tok.encode("return") == [540, 280]
    assert tok.encode_infilling("return") == [280]
    assert tok.encode("\n    return b\n") == [540, 17, 264, 280, 314, 17]
    assert tok.encode_infilling("\n    return b\n") == [17, 264, 280, 314, 17]
    assert tok.encode("x", bos=True, eos=True)[0] == tok.bos_id
    assert tok.encode("x", bos=True, eos=True)[-1] == tok.eos_id


@pytest.mark.parametrize("s", ["return x", "line.split()", "\n    pass", "x=1", "(a, b)", "héllo", "世界", "0.5"])
def test_encode_infilling_has_no_leading_space(tok, s):
    ids = tok.encode_infilling(s)
    assert not tok.piece(ids[0]).startswith("▁"), [tok.piece(i) for i in ids]
    assert tok.decode_infilling(ids) == s
    # encode does add the space: its first piece starts with "▁".
    assert tok.piece(tok.encode(s)[0]).startswith("▁")


@pytest.mark.parametrize("s", [" x", "  # comment", "    return b", "\tif x:"])
def test_encode_infilling_keeps_real_leading_whitespace(tok, s):
    assert tok.decode_infilling(tok.encode_infilling(s)) == s


def test_marker_text_in_source_is_not_a_marker(tok):
    text = "x = '<PRE> <SUF> <MID> <EOT>'  # ▁<PRE>"
    for ids in (tok.encode(text), tok.encode_infilling(text)):
        assert not {tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id, tok.bos_id, tok.eos_id} & set(ids)
    prompt = infilling_prompt_tokens(tok, text, text)
    assert [prompt.count(i) for i in (tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id)] == [1, 1, 1, 0]
    # SentencePiece reads a literal "▁" (U+2581) in text as a space, as Llama's own tokenizer does.
    assert tok.decode(tok.encode(text)) == text.replace("▁", " ")


def test_decode_special_ids_does_not_crash(tok):
    ids = [tok.bos_id, tok.prefix_id, *tok.encode("a = 1"), tok.suffix_id, tok.middle_id, tok.eot_id, tok.eos_id, -1]
    assert tok.decode(ids) == "a = 1"
    assert tok.decode([0]) == " ⁇ "  # unk renders as SentencePiece's unk surface, not an exception
    with pytest.raises(TokenizerError, match=r"\[600, -5\].*\[0, 600\)"):
        tok.decode([5, 600, -5])


def test_decode_middle_stops_at_eot(tok):
    middle = tok.encode_infilling(" = fibonacci(n)")
    assert decode_middle(tok, middle + [tok.eot_id] + tok.encode("junk")) == " = fibonacci(n)"
    assert cut_middle(tok, middle + [tok.eos_id]) == (middle, True)
    assert cut_middle(tok, middle) == (middle, False)


def test_training_is_deterministic(tok_path, tmp_path):
    again = train_test_tokenizer(tmp_path / "again.model")
    assert again.read_bytes() == tok_path.read_bytes()


def test_training_from_files_with_budget(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text(FIXED_CORPUS)
    b.write_text("this file is past the budget\n" * 100)
    out = train_sentencepiece([a, b], tmp_path / "t.model", 500, max_chars=len(FIXED_CORPUS))
    assert out.read_bytes() == train_sentencepiece(FIXED_CORPUS, tmp_path / "u.model", 500).read_bytes()


def test_training_errors_name_the_values(tmp_path):
    with pytest.raises(TokenizerError, match="vocab_size=100000"):
        train_sentencepiece("tiny text", tmp_path / "t.model", 100_000)
    with pytest.raises(TokenizerError, match="missing.py"):
        train_sentencepiece([tmp_path / "missing.py"], tmp_path / "t.model", 500)
    assert not (tmp_path / "t.model").exists()


def test_tokenizer_without_infilling_pieces(tmp_path):
    # Like Code Llama - Python: a plain Llama vocabulary. Plain encoding works, infilling says why not.
    import sentencepiece as spm

    path = tmp_path / "python.model"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(FIXED_CORPUS.split("\n")), model_prefix=str(path)[:-6],
                                   model_type="bpe", vocab_size=500, byte_fallback=True, minloglevel=2,
                                   num_threads=1)
    tok = Tokenizer(path)
    assert tok.encode("return") and not tok.has_infilling
    with pytest.raises(TokenizerError, match=r"infilling is unavailable.*▁<PRE>"):
        infilling_prompt_tokens(tok, "a", "b")


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="junk.model"):
        Tokenizer(tmp_path / "junk.model")
