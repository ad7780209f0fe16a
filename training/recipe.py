"""`codefill recipe RECIPE.toml --output OUT`: train a small Code Llama-architecture model from scratch.

A recipe file (see recipes/codefill-pypi-cpu.toml, the bundled model's) names everything the run depends on:

    [data]       which source tree (a directory, or "stdlib": the running interpreter's standard library minus
                 its site-packages), which extensions, excluded patterns, the held-out share (by file); or
                 `corpus`: a directory `codefill data corpus` wrote, whose held-out packages are held out
    [tokenizer]  SentencePiece vocabulary size and how many characters of train files it learns from
    [model]      the LlamaConfig fields other than vocab_size (the tokenizer's), and the init seed and std
    [fim]        FimConfig: FIM rate, SPM share, seed; line cuts, window length, packing
    [train]      TrainConfig fields (full training: no LoRA)

The run is a chain of steps, each writing one thing in OUT and skipped when that thing is already complete,
so running the same command again after an interruption continues where it stopped (training resumes from
its last checkpoint):

    OUT/recipe.toml            a copy of the recipe; a different recipe (other than in comments) in the same OUT is
                               refused
    OUT/tokenizer.model        trained on train files only (model/tokenizer_training.py)
    OUT/init/                  MODEL_DIR with the tokenizer and seeded random weights
    OUT/data/train.mindrecord  FIM rows of the train files, and train.heldout.json, the held-out file list
    OUT/data/heldout.mindrecord FIM rows of the held-out files, for the held-out loss during training
    OUT/run/                   the trainer's output: metrics.jsonl, loss.png, checkpoints/, model/
    OUT/model/                 the final MODEL_DIR, stored in [train] save_dtype, with the recipe's note
    OUT/summary.json           files, tokens, time and final losses, for the model's documentation

`--trainer torch` trains with the PyTorch trainer (torch_trainer.py: the same step, bf16 on CUDA) instead:
OUT/data holds row files (train-rows-*.npz.xz, heldout-rows-*.npz.xz, corpus_rows.py) in place of MindRecord,
built in parallel (chunks of documents packed apart, so the rows are not the MindSpore path's), and the run
ends with OUT/run/hf, a Hugging Face checkpoint, converted to OUT/model. `--prepare` stops before training
(tokenizer, init and, for torch, the rows): what a GPU machine without SentencePiece needs carried, beside
the repository. `--time-budget` stops a torch run cleanly with a checkpoint; the same command continues it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codefill.model.config import ConfigError, LlamaConfig

from .data_error import DataError
from .fim_examples import FimConfig, FimCounts, fim_pass_rows, fim_rows
from .source_files import STDLIB, SourceConfig, SourceFile, SourceSummary, iter_source_files, source_root
from .train_config import TrainConfig
from .train_error import TrainError

SAVE_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Recipe:
    name: str
    source: str                      # a directory, or "stdlib"
    sources: SourceConfig
    vocab_size: int
    tokenizer_max_chars: int
    arch: dict                       # LlamaConfig fields except vocab_size
    init_seed: int
    init_std: float
    fim: FimConfig
    train: TrainConfig
    heldout_rows: int                # held-out FIM rows written for the loss during training
    save_dtype: str
    text: str                        # the recipe file as written
    corpus: str | None = None        # a `codefill data corpus` directory, in place of `source`

    def arch_config(self, vocab_size: int | None = None) -> LlamaConfig:
        """The model's LlamaConfig, with the tokenizer's vocabulary size (default: the recipe's request)."""
        return LlamaConfig(**self.arch, vocab_size=self.vocab_size if vocab_size is None else vocab_size)

    def source_root(self) -> Path:
        return source_root(self.source)


def _section(doc: dict, name: str, path: Path) -> dict:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise TrainError(f"recipe {path}: [{name}] must be a table, got {value!r}")
    return dict(value)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        doc = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise TrainError(f"cannot read recipe {path}: {e}") from e
    unknown = set(doc) - {"name", "data", "tokenizer", "model", "fim", "train"}
    if unknown:
        raise TrainError(f"recipe {path}: unknown keys {sorted(unknown)}")
    data, tok, model = _section(doc, "data", path), _section(doc, "tokenizer", path), _section(doc, "model", path)
    fim, train = _section(doc, "fim", path), _section(doc, "train", path)
    try:
        corpus = data.pop("corpus", None)
        if corpus is not None and "source" in data:
            raise TrainError(f"[data] sets both source {data['source']!r} and corpus {corpus!r}; choose one")
        source = str(data.pop("source", STDLIB))
        heldout_rows = int(data.pop("heldout_rows", 64))
        if "extensions" in data:
            data["extensions"] = tuple(data["extensions"])
        sources = SourceConfig(**data)
        vocab_size = int(tok.pop("vocab_size"))
        max_chars = int(tok.pop("max_chars", 20_000_000))
        if tok:
            raise TrainError(f"unknown [tokenizer] keys {sorted(tok)}")
        init_seed, init_std = int(model.pop("init_seed", 0)), float(model.pop("init_std", 0.02))
        if "vocab_size" in model:
            raise TrainError("[model] vocab_size comes from the tokenizer; set [tokenizer] vocab_size")
        LlamaConfig(**model, vocab_size=vocab_size)  # validates the fields now, not after the tokenizer
        save_dtype = str(train.pop("save_dtype", "float32"))
        if save_dtype not in SAVE_DTYPES:
            raise TrainError(f"[train] save_dtype must be one of {SAVE_DTYPES}, got {save_dtype!r}")
        if train.get("lora") not in (None, False):
            raise TrainError("a recipe trains from scratch: [train] lora must be absent or false")
        train.pop("lora", None)
        train_cfg = TrainConfig.from_dict({**train, "lora": None})
        fim_cfg = FimConfig(**fim)
        fim_cfg.window_limit(train_cfg.seq_length + 1)  # refused now, not after the tokenizer is trained
    except (TypeError, ValueError, KeyError, DataError) as e:
        raise TrainError(f"recipe {path}: {e}") from e
    except ConfigError as e:
        raise TrainError(f"recipe {path}: [model] {e}") from e
    except TrainError as e:
        raise TrainError(f"recipe {path}: {e}") from e
    if train_cfg.dp != 1 or train_cfg.tp != 1:
        raise TrainError(f"recipe {path}: the recipe runs in one process (dp 1, tp 1), got dp {train_cfg.dp} "
                         f"tp {train_cfg.tp}")
    return Recipe(str(doc.get("name", path.stem)), source, sources, vocab_size, max_chars, model, init_seed,
                  init_std, fim_cfg, train_cfg, heldout_rows, save_dtype, text, None if corpus is None else str(corpus))


def _log(msg: str) -> None:
    print(f"[recipe {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _tokenizer_texts(files, max_chars: int) -> list[str]:
    """Train files in an order fixed by their path hashes (not alphabetical, so no one package dominates a
    budget), whole files until max_chars is reached."""
    texts, total = [], 0
    for f in sorted(files, key=lambda f: hashlib.sha256(f.path.encode()).digest()):
        texts.append(f.text)
        total += len(f.text)
        if total >= max_chars:
            break
    return texts


def heldout_loss_rows(tok, held_files, recipe: Recipe) -> list[tuple[np.ndarray, np.ndarray]]:
    """The padded held-out FIM rows whose loss training reports: `recipe.heldout_rows` of them, an even spread
    over the held-out files' rows (not their first rows only)."""
    from .mindrecord_io import pad_row

    row_length = recipe.train.seq_length + 1
    rows = fim_rows(tok, [(f.path, f.text) for f in held_files], row_length, recipe.fim, FimCounts())
    picked = [pad_row(ids, labels, row_length, tok.eos_id) for ids, labels in rows]
    index = np.linspace(0, len(picked) - 1, min(recipe.heldout_rows, len(picked))).round().astype(int)
    return [picked[i] for i in sorted(set(index.tolist()))]


TRAINERS = ("mindspore", "torch")


def run_recipe(recipe_path: str | Path, out: str | Path, *, progress: bool = True, trainer: str = "mindspore",
               corpus: str | Path | None = None, time_budget_s: float | None = None, prepare: bool = False,
               checkpoint_dtype: str = "float32", autocast: str | None = None, torch_compile: bool = False) -> Path | None:
    """Run (or continue) the recipe into OUT; returns OUT/model (None when `prepare` stops before training).
    Each step below skips what OUT already holds. `corpus` replaces the recipe's [data] corpus path."""
    if trainer not in TRAINERS:
        raise TrainError(f"trainer must be one of {TRAINERS}, got {trainer!r}")
    if trainer != "torch" and (time_budget_s is not None or checkpoint_dtype != "float32" or autocast is not None
                               or torch_compile):
        raise TrainError(f"a time budget ({time_budget_s}), checkpoint dtype ({checkpoint_dtype}), autocast "
                         f"({autocast}) and torch.compile ({torch_compile}) are options of the torch trainer; add --trainer torch")
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s  # the data step counts too
    recipe = load_recipe(recipe_path)
    if corpus is not None:
        if recipe.corpus is None:
            raise TrainError(f"recipe {recipe_path} reads [data] source {recipe.source!r}, not a corpus; "
                             f"drop --corpus {corpus}")
        recipe = dataclasses.replace(recipe, corpus=str(corpus))
    out = Path(out)
    root = _claim_output(recipe, out)
    started = time.time()
    sources = SourceSummary()
    train_files, held_files = _split_sources(root, recipe, sources)
    tok_path = _tokenizer_step(out, recipe, train_files)
    arch = _arch(out, recipe, tok_path)
    init_dir = _init_step(out, recipe, arch, tok_path)
    run_dir = out / "run"
    cfg = dataclasses.replace(recipe.train, eval_rows=recipe.heldout_rows)
    if trainer == "torch":
        rows = _torch_rows_step(out, recipe, tok_path, train_files, held_files)
        if prepare:
            return None
        from .torch_trainer import train_torch

        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        result = train_torch(init_dir, *rows, run_dir, cfg, resume=run_dir.exists(), time_budget_s=left,
                             checkpoint_dtype=checkpoint_dtype, autocast=autocast, torch_compile=torch_compile,
                             progress=progress)
        if result.hf_dir is None:
            raise TrainError(f"training stopped at step {result.steps} of {cfg.max_steps} (time budget); run the "
                             f"command again to continue")
        import importlib

        try:  # converting and saving the final MODEL_DIR check its tokenizer
            importlib.import_module("sentencepiece")
        except ImportError:
            _log(f"trained: {result.hf_dir}. This machine has no SentencePiece: where codefill runs, "
                 f"`codefill convert --from-hf {result.hf_dir}` makes it a MODEL_DIR")
            return result.hf_dir
        trained_dir = _from_hf(result.hf_dir, run_dir / "model")
    else:
        from codefill.model.tokenizer import Tokenizer

        from .trainer import train

        train_data, held_data = _data_step(out, recipe, root, init_dir, Tokenizer(tok_path), train_files, held_files)
        if prepare:
            return None
        result = train(init_dir, train_data, run_dir, cfg, held_out_data=held_data,
                       resume=run_dir.exists(), progress=progress)
        if result.model_dir is None:
            raise TrainError(f"training stopped at step {result.steps} of {cfg.max_steps}; run the command again "
                             f"to continue")
        trained_dir = result.model_dir
    note = (f"{recipe.name}: trained from scratch by `codefill recipe` on {recipe.corpus or recipe.source} "
            f"({len(train_files)} files), {cfg.max_steps} steps ({trainer} trainer); the run is recorded in "
            f"summary.json beside it")
    model_dir = _save_final(trained_dir, out / "model", recipe, arch, tok_path, note)
    summary = _summary(recipe, root, arch, cfg, train_files, held_files, sources, run_dir, started)
    (out / "summary.json").write_text(json.dumps({**summary, "trainer": trainer}, indent=2) + "\n")
    _log(f"done: {model_dir}")
    return model_dir


def export_checkpoint(out: str | Path, dest: str | Path) -> Path:
    """The newest complete checkpoint of the torch run in OUT as a MODEL_DIR at dest, its note naming the recipe
    and step: what `codefill eval` measures while the run goes on."""
    from .torch_trainer import checkpoint_model_dir, latest_checkpoint

    out = Path(out)
    ckpt = latest_checkpoint(out / "run")
    if ckpt is None or not (out / "init" / "config.json").is_file():
        raise TrainError(f"{out} holds no checkpoint of a torch run (run/checkpoints/step-N with COMPLETE, and "
                         f"init/); nothing to export")
    step = int(json.loads((ckpt / "state.json").read_text())["step"])
    name = load_recipe(out / "recipe.toml").name if (out / "recipe.toml").is_file() else out.name
    return checkpoint_model_dir(ckpt, out / "init", dest,
                                note=f"{name} at step {step}: a checkpoint of a run in progress ({ckpt})")


def _arch(out: Path, recipe: Recipe, tok_path: Path) -> LlamaConfig:
    """The architecture with the tokenizer's vocabulary: read from OUT/init when it exists (no SentencePiece
    needed there), else from the tokenizer."""
    if (out / "init" / "config.json").exists():
        from codefill.model.checkpoint import read_model_config

        return read_model_config(out / "init")[0]
    from codefill.model.tokenizer import Tokenizer

    return recipe.arch_config(Tokenizer(tok_path).vocab_size)


def _torch_rows_step(out: Path, recipe: Recipe, tok_path: Path, train_files, held_files):
    """OUT/data/train-rows-*.npz.xz and heldout-rows-*.npz.xz (corpus_rows.py), built unless present; returns the
    (train, held-out) Rows. The held-out rows are the MindSpore path's (heldout_loss_rows)."""
    from .corpus_rows import Rows, fim_rows_parallel, load_rows, row_paths, save_rows

    data_dir = out / "data"
    train_paths, held_paths = row_paths(data_dir, "train-rows"), row_paths(data_dir, "heldout-rows")
    if train_paths and held_paths:
        return load_rows(train_paths), load_rows(held_paths)
    from codefill.model.tokenizer import Tokenizer

    row_length = recipe.train.seq_length + 1
    _log(f"data: FIM rows of {row_length} tokens from {len(train_files)} files")
    train = fim_rows_parallel([(f.path, f.text) for f in train_files], tok_path, recipe.fim, row_length)
    held = heldout_loss_rows(Tokenizer(tok_path), held_files, recipe)
    held = Rows.of_labels(np.stack([r[0] for r in held]), np.stack([r[1] for r in held]))
    tmp = data_dir.with_name(data_dir.name + ".rows-tmp")
    save_rows(train, tmp, "train-rows")
    save_rows(held, tmp, "heldout-rows")
    data_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(tmp.iterdir()):
        path.replace(data_dir / path.name)
    tmp.rmdir()
    _log(f"data: {len(train)} train rows, {len(held)} held-out rows")
    return train, held


def _from_hf(hf_dir: Path, model_dir: Path) -> Path:
    """The PyTorch trainer's Hugging Face output as a MODEL_DIR (`codefill convert --from-hf`)."""
    from codefill.model.convert import hf_to_model_dir

    return hf_to_model_dir(hf_dir, model_dir, overwrite=True, progress=False)


def _claim_output(recipe: Recipe, out: Path) -> Path:
    """Check the recipe's source and that OUT holds no other recipe's run; copy the recipe into OUT. Returns
    the source root."""
    root = Path(recipe.corpus) if recipe.corpus is not None else recipe.source_root()
    if recipe.corpus is not None and not (root / "corpus.json").is_file():
        raise TrainError(f"recipe corpus {root} has no corpus.json: not a `codefill data corpus` output")
    if not root.is_dir():
        raise TrainError(f"recipe source {recipe.source!r} ({root}) is not a directory")
    copy = out / "recipe.toml"
    if copy.exists() and tomllib.loads(copy.read_text(encoding="utf-8")) != tomllib.loads(recipe.text):  # comments aside
        raise TrainError(f"{out} holds a run of a different recipe ({copy}); use another --output")
    out.mkdir(parents=True, exist_ok=True)
    copy.write_text(recipe.text, encoding="utf-8")
    return root


def _split_sources(root: Path, recipe: Recipe, sources: SourceSummary) -> tuple[list, list]:
    """(train files, held-out files) of the source tree, or of the corpus's shards; both must be non-empty."""
    if recipe.corpus is not None:
        files = _corpus_files(root, sources)
    else:
        files = list(iter_source_files(root, recipe.sources, sources))
    train_files = [f for f in files if not f.held_out]
    held_files = [f for f in files if f.held_out]
    if not train_files or not held_files:
        raise TrainError(f"recipe source {root}: {len(train_files)} train and {len(held_files)} held-out files; "
                         f"both must be non-empty\n{sources.report()}")
    _log(f"sources: {len(train_files)} train files ({sum(len(f.text) for f in train_files):,} chars), "
         f"{len(held_files)} held out ({sum(len(f.text) for f in held_files):,} chars) under {root}")
    return train_files, held_files


def _corpus_files(root: Path, sources: SourceSummary) -> list[SourceFile]:
    """A corpus's documents as source files named PACKAGE/PATH; the held-out shards' are held out."""
    from .corpus_shards import read_docs, shard_paths

    sources.root = str(root)
    files = [SourceFile(f"{d.package}/{d.path}", d.text, part == "heldout")
             for part in ("train", "heldout") for d in read_docs(shard_paths(root, part))]
    sources.listed = len(files)
    sources.held_out = sum(f.held_out for f in files)
    sources.train = len(files) - sources.held_out
    return files


def _tokenizer_step(out: Path, recipe: Recipe, train_files) -> Path:
    """OUT/tokenizer.model, trained on the train files only."""
    tok_path = out / "tokenizer.model"
    if not tok_path.exists():
        from codefill.model.tokenizer_training import train_sentencepiece

        _log(f"tokenizer: {recipe.vocab_size} pieces from up to {recipe.tokenizer_max_chars:,} characters")
        train_sentencepiece(_tokenizer_texts(train_files, recipe.tokenizer_max_chars), tok_path, recipe.vocab_size)
    return tok_path


def _init_step(out: Path, recipe: Recipe, arch: LlamaConfig, tok_path: Path) -> Path:
    """OUT/init: a MODEL_DIR of the recipe's seeded random weights."""
    init_dir = out / "init"
    if not (init_dir / "config.json").exists():
        from codefill.model.checkpoint import save_model_dir
        from codefill.model.tiny import random_weights

        _log(f"init: {arch.n_params() / 1e6:.2f} M parameters, seed {recipe.init_seed}, std {recipe.init_std}")
        save_model_dir(init_dir, arch, random_weights(arch, recipe.init_seed, recipe.init_std), tok_path,
                       note=f"random initialisation of recipe {recipe.name}", overwrite=True)
    return init_dir


def _data_step(out: Path, recipe: Recipe, root: Path, init_dir: Path, tok, train_files, held_files
               ) -> tuple[Path, Path]:
    """OUT/data/train.mindrecord (FIM rows of the train files) and heldout.mindrecord (the held-out loss's)."""
    from .mindrecord_io import pad_row, write_rows
    from .tokenize_data import tokenize_fim

    data_dir = out / "data"
    train_data, held_data = data_dir / "train.mindrecord", data_dir / "heldout.mindrecord"
    row_length = recipe.train.seq_length + 1
    if not train_data.exists():
        _log(f"data: FIM rows of {row_length} tokens")
        if recipe.corpus is not None:  # the corpus's documents, in shard order
            rows = fim_pass_rows(tok, [(f.path, f.text) for f in train_files], row_length, recipe.fim)
            write_rows(train_data, (pad_row(ids, labels, row_length, tok.eos_id) for ids, labels in rows),
                       overwrite=True, description=f"codefill FIM rows of {row_length} tokens from {root}")
        else:
            summary = tokenize_fim(init_dir, root, train_data, recipe.train.seq_length, fim=recipe.fim,
                                   sources=recipe.sources, overwrite=True)
            _log("\n" + summary.report())
    if not held_data.exists():
        write_rows(held_data, heldout_loss_rows(tok, held_files, recipe), overwrite=True,
                   description=f"codefill held-out FIM rows of {row_length} tokens")
    return train_data, held_data


def _save_final(trained_dir: Path, model_dir: Path, recipe: Recipe, arch: LlamaConfig, tok_path: Path,
                note: str) -> Path:
    """OUT/model: the trained weights in the recipe's save_dtype, with the recipe's note."""
    from codefill.model.checkpoint import load_model_dir, save_model_dir

    weights = dict(load_model_dir(trained_dir, dtype=None).weights)
    if recipe.save_dtype == "bfloat16":
        from codefill.model.safetensors_io import BFLOAT16, from_float32

        weights = {k: from_float32(v, BFLOAT16) for k, v in weights.items()}
    return save_model_dir(model_dir, arch, weights, tok_path, note=note, overwrite=True)


def tokens_trained(losses: list[dict]) -> int:
    """Positions trained on, from the trainers' loss records: each holds its own step's "tokens" and is written
    every log_every steps, so it stands for the steps since the record before it (a resumed run may repeat a step)."""
    total, last = 0, 0
    for m in sorted({m["step"]: m for m in losses}.values(), key=lambda m: m["step"]):
        total += (m["step"] - last) * m["tokens"]
        last = m["step"]
    return total


def train_elapsed_s(losses: list[dict]) -> float:
    """Training time over every call of a resumed run: each call's records count "elapsed_s" from its own start,
    so a drop in elapsed_s starts a new segment, and the segments' last values add up."""
    total, last = 0.0, 0.0
    for m in losses:
        if m["elapsed_s"] < last:
            total += last
        last = m["elapsed_s"]
    return total + last


def _summary(recipe: Recipe, root: Path, arch: LlamaConfig, cfg: TrainConfig, train_files, held_files,
             sources: SourceSummary, run_dir: Path, started: float) -> dict:
    """What OUT/summary.json records: files, tokens, time and final losses (from OUT/run/metrics.jsonl)."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m for m in metrics if "loss" in m]
    held = [m for m in metrics if "held_out_loss" in m]
    return {
        "name": recipe.name, "source": recipe.corpus or recipe.source, "root": str(root), "python": platform.python_version(),
        "train_files": len(train_files), "held_out_files": len(held_files),
        "held_out_paths": [f.path for f in held_files],
        "train_chars": sum(len(f.text) for f in train_files), "parameters": arch.n_params(),
        "architecture": arch.to_dict(), "steps": cfg.max_steps,
        "tokens_trained": tokens_trained(losses), "final_train_loss": losses[-1]["loss"] if losses else None,
        "final_held_out_loss": held[-1]["held_out_loss"] if held else None,
        "train_seconds_this_call": round(time.time() - started, 1),
        "train_elapsed_s_last_segment": losses[-1]["elapsed_s"] if losses else None,
        "train_elapsed_s_all_segments": round(train_elapsed_s(losses), 1),
        "save_dtype": recipe.save_dtype, "sources": sources.report(),
    }
