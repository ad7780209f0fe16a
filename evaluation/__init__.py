"""Evaluation: HumanEval pass@k in a sandbox, HumanEval infilling, held-out FIM, and a non-neural baseline."""
