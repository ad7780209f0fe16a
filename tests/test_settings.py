"""lsp/settings.py: the client's options merged over the defaults; an empty list is empty settings (Neovim's
JSON encoder writes an empty Lua table as `[]`), anything else that is not an object is refused by name."""

from __future__ import annotations

import pytest

from codefill.lsp.settings import Settings, SettingsError


@pytest.mark.parametrize("options", [None, {}, [], {"codefill": {}}, {"codefill": []}])
def test_empty_options_keep_the_settings(options):
    base = Settings(max_new_tokens=7)
    assert base.merged(options) == base


def test_options_apply_at_top_level_or_under_codefill():
    assert Settings().merged({"temperature": 0.5}).temperature == 0.5
    assert Settings().merged({"codefill": {"languages": ["python"]}}).languages == ("python",)


@pytest.mark.parametrize("options, message", [
    ([1], "settings must be a JSON object, got list [1]"),
    ("x", "settings must be a JSON object, got str 'x'"),
    ({"max_new_tokns": 3}, "unknown setting(s) max_new_tokns"),
    ({"codefill": {"tp": 0}}, "setting tp = 0: must be an integer >= 1"),
])
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(SettingsError) as e:
        Settings().merged(options)
    assert message in str(e.value)
