"""Golden tests for each post-processing rule: raw middle in, what the editor shows out."""

import pytest

from codefill.lsp.postprocess import Fitted, fit, wants_multiline


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
