"""Test-session settings shared by every test file."""

from __future__ import annotations

import os
import tempfile

# What codefill caches between runs (compiled graphs, built kernels, llama.cpp) goes to a directory of this
# session, never to the user's ~/.cache: a test must not read what an earlier run left behind.
os.environ["CODEFILL_CACHE"] = tempfile.mkdtemp(prefix="codefill-test-cache-")
