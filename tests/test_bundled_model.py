"""The bundled model (models/codefill-pypi-5m): present, trained, and what README command (a) serves."""

import json
from pathlib import Path

from codefill.bundled import bundled_model_dir
from codefill.model.checkpoint import load_model_dir
from codefill.model.tokenizer import Tokenizer
from helpers import run_codefill

ROOT = Path(__file__).resolve().parent.parent


def test_the_bundled_model_is_in_the_repository_and_loads():
    model = bundled_model_dir()
    assert model == ROOT / "models" / "codefill-pypi-5m"
    files = load_model_dir(model)
    assert files.config.max_seq_len == 1024 and files.config.n_params() > 4_000_000
    tok = Tokenizer(files.tokenizer_path)
    assert tok.has_infilling and tok.vocab_size == files.config.vocab_size
    assert tok.decode_infilling(tok.encode_infilling("    x = 'é\\t'\n")) == "    x = 'é\\t'\n"  # whitespace, bytes
    note = json.loads((model / "config.json").read_text())["note"]
    assert "trained from scratch" in note and "UNTRAINED" not in note
    # the learning curve it shipped with: trained well below uniform (ln 8192 = 9.01 nats per token)
    metrics = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
    held = [m["held_out_loss"] for m in metrics if "held_out_loss" in m]
    assert held[-1] < 3.0 < 4.5 < held[0]
    # its model card is about this model: the name the recipe run recorded
    name = json.loads((model / "summary.json").read_text())["name"]
    assert name.startswith("codefill-pypi-") and name in note
    assert (model / "README.md").read_text().startswith(f"# {name}: the bundled model")
    # trained on the corpus whose data card is beside it, none of its held-out packages' files among the train files
    data_card = (model / "DATA.md").read_text()
    assert data_card.startswith("# Corpus corpus-pypi-v1") and "held out (whole packages" in data_card
    summary = json.loads((model / "summary.json").read_text())
    assert summary["held_out_files"] > 0 and summary["tokens_trained"] == summary["steps"] * 8 * 1024


def test_readme_command_a_serves_the_bundled_model_through_the_language_server(tmp_path):
    """`codefill demo` with no --model, from another directory: the real server, a real worker, the bundled
    weights; the demo exits non-zero when no inline completion comes back."""
    done = run_codefill("demo", cwd=tmp_path)
    assert f"(model {bundled_model_dir()})" in done.stdout
    assert "inline completion (" in done.stdout
    items = json.loads(done.stdout.split("inline completion (", 1)[1].split(": ", 1)[1].splitlines()[0])
    assert items and all(isinstance(i, str) and i.strip() for i in items)
