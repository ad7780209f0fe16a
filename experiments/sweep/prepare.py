"""Everything the torch replica needs, in experiments/sweep/carry/ (about 26 MB; run from the repository root):

  NAME.npz      the train rows of a data variant (ids as uint16, the scored-position mask bit-packed), and the
                held-out rows whose loss is reported: always the v3 recipe's, one yardstick for every variant
  prompts.json  the evaluation prompts exactly as `codefill eval infill --recipe` builds them (HumanEval
                single-line SPM, and held-out FIM of the recipes' 39 held-out files), with the stop ids
  hf.json       the architecture as a Hugging Face config and our weight names -> HF names (same layout)

Data variants are recipes' [fim] sections, tokenized with the bundled tokenizer (every recipe here trains the
same one: same files, size and seed). Takes about 4 minutes on 2 cores.

    .venv/bin/python experiments/sweep/prepare.py
"""
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from codefill.evaluation.humaneval import load_problems
from codefill.evaluation.infilling import HeldOutConfig, heldout_tasks, humaneval_tasks
from codefill.model.config import LlamaConfig
from codefill.model.tokenizer import Tokenizer
from codefill.model.weights import hf_name_map
from codefill.training.fim_eval import FimEvalConfig, task_prompt
from codefill.training.fim_examples import fim_pass_rows
from codefill.training.mindrecord_io import IGNORE_INDEX, pad_row
from codefill.training.recipe import heldout_loss_rows, load_recipe
from codefill.training.source_files import iter_source_files

HERE = Path(__file__).parent
OUT = HERE / "carry"
BUNDLED = Path("models/codefill-stdlib")
V2, V3, V4 = "recipes/codefill-stdlib-v2.toml", "recipes/codefill-stdlib-v3.toml", "recipes/codefill-stdlib.toml"
# name -> (recipe, overrides of its [fim] section)
VARIANTS = {"v2": (V2, {}), "v3": (V3, {}), "v4": (V3, {"line_lines": 3}), "v4b": (V4, {})}

tok = Tokenizer(BUNDLED / "tokenizer.model")


def packed(rows, row_length):
    """(ids, labels) rows, padded here unless they already are -> uint16 ids and the bit-packed scored mask."""
    rows = [r if isinstance(r[0], np.ndarray) else pad_row(*r, row_length, tok.eos_id) for r in rows]
    ids = np.stack([r[0] for r in rows])
    scored = np.stack([r[1] for r in rows]) != IGNORE_INDEX
    assert ids.max() < 65536
    return ids.astype(np.uint16), np.packbits(scored, axis=1)


def files_of(recipe):
    files = list(iter_source_files(recipe.source_root(), recipe.sources))
    return [f for f in files if not f.held_out], [f for f in files if f.held_out]


OUT.mkdir(exist_ok=True)
yardstick = load_recipe(V3)
row_length = yardstick.train.seq_length + 1
held_ids, held_mask = packed(heldout_loss_rows(tok, files_of(yardstick)[1], yardstick), row_length)
for name, (path, overrides) in VARIANTS.items():
    recipe = load_recipe(path)
    fim = replace(recipe.fim, **overrides)
    train_files, _ = files_of(recipe)
    ids, mask = packed(fim_pass_rows(tok, [(f.path, f.text) for f in train_files], row_length, fim), row_length)
    np.savez_compressed(OUT / f"{name}.npz", train_ids=ids, train_mask=mask, heldout_ids=held_ids,
                        heldout_mask=held_mask)
    print(name, "train rows", ids.shape, "held-out rows", held_ids.shape, flush=True)

single = humaneval_tasks(load_problems(), "single")
single_cfg = FimEvalConfig(max_tasks=len(single), max_new_tokens=48, max_seq_len=1024, spm=True, context_lines=10_000)
held = HeldOutConfig.of_recipe(yardstick, FimEvalConfig(max_tasks=256, max_new_tokens=64))
held_cfg = replace(held.fim, max_seq_len=1024, spm=True)
held_tasks, _ = heldout_tasks(held.root(), held.files, held_cfg)
prompts = {"single": [task_prompt(tok, t, single_cfg) for t in single],
           "held": [task_prompt(tok, t, held_cfg) for t in held_tasks],
           "max_new": {"single": 48, "held": 64}, "eot": tok.eot_id, "eos": tok.eos_id}
(OUT / "prompts.json").write_text(json.dumps(prompts))
print("prompts", {k: len(v) for k, v in prompts.items() if isinstance(v, list)})

# train.py sets the shape of each run (its defaults are v2's, below); the rest of the config is common.
config = LlamaConfig(dim=256, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, ffn_dim=768,
                     norm_eps=1e-5, rope_theta=1e6, max_seq_len=1024)
(OUT / "hf.json").write_text(json.dumps({"config": config.to_hf(bos_id=tok.bos_id, eos_id=tok.eos_id,
                                                                torch_dtype="float32"),
                                         "names": hf_name_map(config)}, indent=1))
