"""Golden tests for each post-processing rule: raw middle in, what the editor shows out."""

import pytest

from codefill.lsp.postprocess import Fitted, fit, inserts_lines, min_new_tokens, wants_multiline


@pytest.mark.parametrize("prefix,suffix,multi", [
    ("x = foo(", ")\n", False),                  # code after the cursor: this line only
    ("    total = ", "\n", False),               # a code line that opens nothing
    ("def f(x):\n    ", "\n", True),             # blank line inside a block
    ("def f(x):", "\n", True),                   # end of a block opener
    ("items = [", "\n", True),
    ("", "", True),                              # empty file
])
def test_rule1_single_or_multi_line(prefix, suffix, multi):
    assert wants_multiline(prefix, suffix) is multi


def test_rule1_single_line_cuts_at_newline():
    assert fit("    total = ", "\n", "sum(values)\n    return total\n") == Fitted("sum(values)", 0)


def test_rule2_stops_at_dedent_out_of_the_block():
    prefix = "def mean(values):\n    "
    middle = "total = sum(values)\n    return total / len(values)\n\ndef median(values):\n    pass"
    assert fit(prefix, "\n", middle).text == "total = sum(values)\n    return total / len(values)"


def test_rule2_on_a_blank_line_the_block_is_the_first_lines():
    # the cursor at column 0 of a blank line inside a function: the middle's own indentation sets the block
    middle = "    return total\n\ndef median(values):\n    pass"
    assert fit("def mean(values):\n    total = sum(values)\n", "\n", middle).text == "    return total"
    # a middle that starts at the cursor's column keeps the lines at that column, as before
    middle = "def median(values):\n    return sorted(values)[0]\n\ndef mode(values):"
    assert fit("x = 1\n", "\n", middle).text == middle


def test_rule2_block_opener_keeps_only_deeper_lines():
    prefix = "for v in values:"
    middle = "\n    total += v\n    count += 1\nprint(total)"
    assert fit(prefix, "\n", middle).text == "\n    total += v\n    count += 1"


def test_rule2_blank_lines_inside_the_block_are_kept_then_trimmed():
    prefix = "class A:\n    "
    middle = "def f(self):\n        return 1\n\n    def g(self):\n        return 2\n\nx = A()"
    assert fit(prefix, "\n", middle).text == "def f(self):\n        return 1\n\n    def g(self):\n        return 2"


def test_rule3_drops_lines_that_repeat_what_follows():
    prefix = "def f(x):\n    "
    suffix = "\n    return y\n\nprint(f(1))\n"
    middle = "y = x * 2\n    return y\n"
    assert fit(prefix, suffix, middle).text == "y = x * 2"


def test_rule3_a_middle_that_only_repeats_the_rest_of_the_line_is_dropped():
    assert fit("x = compute(", "a, b)\n", "a, b)") is None


@pytest.mark.parametrize("prefix,suffix,middle,expected", [
    ("print(", ")\n", "x)", Fitted("x)", 1)),              # the model closed what the editor auto-closed
    ("d = {'a': [", "]}\n", "1, 2]}", Fitted("1, 2]}", 2)),
    ("s = \"", "\"\n", "hello\"", Fitted("hello\"", 1)),
    ("print(", ")\n", "f(x)", Fitted("f(x)", 0)),          # its ")" closes its own "(": nothing replaced
    ("print(", ")\n", "x", Fitted("x", 0)),                # leaves the auto-closed ")" in place
    ("foo(", "\n", "x)", Fitted("x)", 0)),                 # nothing after the cursor to replace
])
def test_rule4_brackets_replace_the_auto_closed_tail(prefix, suffix, middle, expected):
    assert fit(prefix, suffix, middle) == expected


def test_rule5_trailing_whitespace_is_trimmed():
    assert fit("def f():\n    ", "", "x = 1   \n    return x  \n\n\n").text == "x = 1\n    return x"


@pytest.mark.parametrize("middle", ["", "   ", "\n\n", " \t\n  "])
def test_rule6_empty_or_whitespace_is_no_suggestion(middle):
    assert fit("def f():\n    ", "\n", middle) is None


def test_rule6_mid_line_middle_starting_with_newline_is_no_suggestion():
    assert fit("x = foo(", ")\n", "\n    y = 2") is None


def test_crlf_documents():
    assert fit("def f():\r\n    ", "\r\n", "x = 1\r\n    return x\r\n").text == "x = 1\n    return x"


# --- rule 1, lines inserted above the code after the cursor ------------------------------------------------

BODY_PREFIX = "def f(xs):\n    total = 0\n"


@pytest.mark.parametrize("prefix,suffix,inserts", [
    (BODY_PREFIX, "    return total\n", True),           # column 0 of a code line
    (BODY_PREFIX + "    ", "return total\n", True),       # in its indentation
    (BODY_PREFIX + "    ", "\n", False),                  # a blank line: a block instead
    ("x = foo(", ")\n", False),                           # code before the cursor: the rest of the line
])
def test_rule1_the_start_of_a_code_line_inserts_lines(prefix, suffix, inserts):
    assert inserts_lines(prefix, suffix) is inserts
    assert not (inserts and wants_multiline(prefix, suffix))


def test_rule1_inserted_lines_end_with_a_line_break_and_keep_the_codes_column():
    # the first line only: the model did not say where its middle ends
    assert fit(BODY_PREFIX, "    return total\n", "    n = len(xs)\n    m = 1\n    k = 2") == Fitted("    n = len(xs)\n", 0)
    # in the indentation, the indentation is repeated after the break: "    return total" stays as it was
    assert fit(BODY_PREFIX + "    ", "return total\n", "n = len(xs)\n    m = 1") == Fitted("n = len(xs)\n    ", 0)


def test_rule1_inserted_lines_run_to_where_the_model_writes_the_following_code():
    middle = "    n = len(xs)\n    for x in xs:\n        total += x\n    return total\n\ndef g():\n"
    assert fit(BODY_PREFIX, "    return total\n", middle).text == "    n = len(xs)\n    for x in xs:\n        total += x\n"
    # ... or to <EOT>, or to the worker's stop before that code (trailing blank lines and whitespace trimmed)
    assert fit(BODY_PREFIX, "    return total\n", "    n = 1  \n    m = 2\n\n", ended=True).text == "    n = 1\n    m = 2\n"
    # a middle that starts with the following code itself suggests nothing; nor does a blank one
    assert fit(BODY_PREFIX, "    return total\n", "    return total\n    x = 1") is None
    assert fit(BODY_PREFIX, "    return total\n", "\n\n", ended=True) is None


@pytest.mark.parametrize("prefix, on_blank, max_new, expected", [
    ("def f():\n    ", 3, 16, 3),    # a blank line to write: the model must write something first
    ("def f():\n    ", 3, 2, 2),     # never more than the request may write
    ("def f():\n    x = ", 3, 16, 0),  # after code on the line, ending at once can be right
    ("", 0, 16, 0),
])
def test_min_new_tokens_only_on_a_blank_line_and_within_the_budget(prefix, on_blank, max_new, expected):
    assert min_new_tokens(prefix, on_blank, max_new) == expected
