"""`python -m codefill.lsp ...` is `codefill serve ...`: the language server over stdio."""

import sys

from codefill.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
