"""Prompt building by tokens: the budget is exact, cuts fall on line boundaries, and order is stable."""

import random

import pytest

from codefill.lsp.prompt import Chunk, PromptConfig, PromptError, build_prompt, comment_prefix
from codefill.model.fim import infilling_prompt_tokens
from codefill.model.tokenizer import Tokenizer
from helpers import FIXED_CORPUS, train_test_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer(train_test_tokenizer(tmp_path_factory.mktemp("tok") / "tok.model"))


def split_at(text: str, index: int) -> tuple[str, str]:
    return text[:index], text[index:]


DOC = FIXED_CORPUS * 3


def test_a_prompt_that_fits_is_exactly_the_fim_prompt(tok):
    prefix, suffix = "def f(x):\n    return ", "\n\nprint(f(2))\n"
    for spm in (False, True):
        p = build_prompt(tok, prefix, suffix, PromptConfig(spm=spm, path_header=False))
        assert p.ids == infilling_prompt_tokens(tok, prefix, suffix, spm=spm)
        assert (p.prefix, p.suffix, p.context) == (prefix, suffix, "")


def test_header_and_chunks_go_before_the_prefix_in_the_given_order(tok):
    chunks = [Chunk("b/util.py", "def helper():\n    pass\n"), Chunk("a/other.py", "X = 1")]
    p = build_prompt(tok, "import os\n", "", PromptConfig(), path="pkg/mod.py", language_id="python", chunks=chunks)
    assert p.context == ("# Path: b/util.py\ndef helper():\n    pass\n# Path: a/other.py\nX = 1\n"
                         "# Path: pkg/mod.py\n")
    assert p.n_chunks == 2
    assert p.ids == infilling_prompt_tokens(tok, p.context + "import os\n", "", spm=True)


def test_unknown_language_gets_no_header():
    assert comment_prefix("python") == "#" and comment_prefix("rust") == "//" and comment_prefix("lua") == "--"
    assert comment_prefix("made-up") is None and comment_prefix(None) is None


@pytest.mark.parametrize("spm", [True, False])
def test_budget_is_exact_and_cuts_fall_on_line_boundaries(tok, spm):
    rng = random.Random(0)
    chunks = [Chunk(f"f{i}.py", FIXED_CORPUS[i * 200:(i + 1) * 200]) for i in range(4)]
    for _ in range(60):
        prefix, suffix = split_at(DOC, rng.randrange(len(DOC)))
        budget = rng.choice([16, 40, 100, 300, 700, 2000])
        cfg = PromptConfig(max_prompt_tokens=budget, spm=spm)
        p = build_prompt(tok, prefix, suffix, cfg, path="m.py", language_id="python", chunks=chunks)
        assert len(p.ids) <= budget
        assert prefix.endswith(p.prefix) and suffix.startswith(p.suffix)
        cursor_line_start = prefix.rfind("\n") + 1
        if len(prefix) > len(p.prefix) > len(prefix) - cursor_line_start:  # cut above the cursor line: at a line
            assert prefix[len(prefix) - len(p.prefix) - 1] == "\n"
        if p.suffix != suffix:  # whole lines, or a cut inside the cursor line when that alone is too long
            assert p.suffix.endswith("\n") or "\n" not in p.suffix
        assert p.ids == infilling_prompt_tokens(tok, p.context + p.prefix, p.suffix, spm=spm)


def test_nearest_prefix_lines_win_over_suffix_and_context(tok):
    prefix, suffix = split_at(DOC, len(DOC) // 2)
    p = build_prompt(tok, prefix, suffix, PromptConfig(max_prompt_tokens=300),
                     chunks=[Chunk("x.py", FIXED_CORPUS)])
    prefix_tokens = len(tok.encode(p.prefix))
    assert prefix_tokens >= len(tok.encode_infilling(p.suffix))
    assert len(tok.encode_infilling(p.suffix)) <= int((300 - 4) * 0.25)
    # Whole lines: one more line of prefix would not have fitted with the same suffix and no context.
    more = prefix[: len(prefix) - len(p.prefix)].splitlines(keepends=True)[-1] + p.prefix
    assert len(infilling_prompt_tokens(tok, more, p.suffix, spm=True)) > 300


def test_short_files_leave_room_for_more_context(tok):
    chunks = [Chunk(f"c{i}.py", "def g%d():\n    return %d\n" % (i, i)) for i in range(30)]
    small = build_prompt(tok, "x = 1\n", "", PromptConfig(max_prompt_tokens=400), chunks=chunks)
    assert small.n_chunks > 0
    assert len(small.ids) <= 400


def test_typing_keeps_the_prompt_start_stable_in_spm(tok):
    """Consecutive keystrokes give prompts that share all but the last few ids (what the prefix cache needs)."""
    base = DOC[:1500]
    suffix = DOC[1500:1800]
    previous = None
    shared = []
    for n in range(20):
        p = build_prompt(tok, base + "value = compute("[:n], suffix, PromptConfig(max_prompt_tokens=400),
                         path="m.py", language_id="python")
        if previous is not None:
            common = 0
            while common < min(len(p.ids), len(previous)) and p.ids[common] == previous[common]:
                common += 1
            shared.append(len(previous) - common)
        previous = p.ids
    # Within one line the cut never moves, so at most the last few tokens change per keystroke.
    assert max(shared) <= 3, shared


def test_an_overlong_cursor_line_is_cut_inside_the_line(tok):
    line = "x = [" + ", ".join(str(i) for i in range(400))
    p = build_prompt(tok, line, "]\n", PromptConfig(max_prompt_tokens=64, path_header=False))
    assert len(p.ids) <= 64 and line.endswith(p.prefix) and p.prefix


@pytest.mark.parametrize("kwargs,needle", [
    ({"max_prompt_tokens": 4}, "max_prompt_tokens"),
    ({"suffix_share": 1.5}, "suffix_share"),
    ({"context_share": -0.1}, "context_share"),
])
def test_bad_configs_are_refused(kwargs, needle):
    with pytest.raises(PromptError, match=needle):
        PromptConfig(**kwargs)
