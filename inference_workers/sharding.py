"""Tensor-parallel sharding: which slice of each tensor a rank keeps, the transform that turns a plain
`llama.Transformer` into one rank's shard, and the files of a split model (split, load, merge).

The model file knows nothing of this (gpt-fast's tp.py idea). A rank builds the plain Transformer from the
full config, then `shard_transformer` replaces child Cells with this rank's slices; serving and training use
the same transform, and the parallel Cells it puts in (tp_cells.py) carry the backward training needs:

- column-parallel wq, wk, wv, w1, w3: rank r of N keeps output rows [r*out/N, (r+1)*out/N). For attention
  that is query heads [r*H/N, (r+1)*H/N) and KV heads [r*KV/N, (r+1)*KV/N). Query head h reads KV head h // R
  (R = H / KV), so a rank's query heads need exactly its own KV heads: attention runs with no communication,
  on H/N query and KV/N key/value heads, with a per-rank KV cache [max_batch, KV/N, S, D]. Qwen2's q/k/v
  biases [out] are cut like the rows they add to.
- row-parallel wo, w2: rank r keeps input columns [r*in/N, ...) and computes a partial sum x_r @ W_r^T,
  all-reduced (sum) inside the graph, so every rank holds the full residual stream. Two all-reduces of
  [B, T, dim] per layer forward; nothing else is communicated inside a layer.
- output head: vocab-parallel. Rank r computes logits for vocab rows [r*V/N, ...) and an AllGather puts the
  logits together on every rank. On a small vocabulary-heavy model the head is the biggest single matmul of
  a decode step; replicating it would leave every rank doing the whole of it.
- embedding: replicated. A lookup reads only B*T rows, so sharding it saves no time and would add an
  all-reduce of [B, T, dim] per step. It costs (1 - 1/N) of V * dim values more memory per rank than
  sharding it (Code Llama 7B: 262 MB in fp16), the first thing to shard if memory gets tight.
- RMSNorm gains and rotary tables are replicated. The norms in front of column-parallel projections (the
  attention and FFN norms, the final norm before the head) become `RankInputNorm`: the same RMSNorm with
  Megatron's f after it (identity forward, gradient all-reduced backward), once per normed state.

N must divide n_heads, n_kv_heads, ffn_dim and vocab_size; `check_tp` says which one does not, and the
launchers call it before any rank starts. (Code Llama 34B has 8 KV heads: TP up to 8.)

Weights: a rank reads only its shard. From a full MODEL_DIR the safetensors file is memory-mapped and each
tensor sliced before conversion (`shard_weights`), so a rank copies only its 1/N of the column- and
row-parallel tensors. Or `split_model_dir` writes one file per rank plus `split.json` (tp size, full
architecture, stored dtype); loading a split made for another TP size is a `TensorParallelError` naming both
sizes. `merge_split_dir` is the inverse of the split: byte for byte, the stored dtype kept.

This module imports MindSpore only inside `shard_transformer`, so launchers can check sizes without it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from codefill.errors import CodefillError
from codefill.model.checkpoint import (
    WEIGHTS_NAME,
    CheckpointError,
    atomic_directory,
    check_vocab,
    check_weights,
    load_model_dir,
    open_tokenizer,
    read_model_config,
    save_model_dir,
    tokenizer_name,
    write_json_synced,
)
from codefill.model.config import ConfigError, LlamaConfig
from codefill.model.safetensors_io import SafetensorsError, read_safetensors, to_float32, write_safetensors
from codefill.model.weights import expected_shapes

SPLIT_FORMAT, SPLIT_VERSION, SPLIT_NAME = "codefill-tp-split", 1, "split.json"

# Which tensors are cut, and along which axis of the [out, in] weight.
_COLUMN_PARALLEL = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                    "feed_forward.w1.weight", "feed_forward.w3.weight",  # rows: output features
                    "attention.wq.bias", "attention.wk.bias", "attention.wv.bias")  # Qwen2: cut like the rows
_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")  # columns: input features


class TensorParallelError(CodefillError, ValueError):
    """A TP size that does not fit the model or the files, or ranks that disagree; names the values."""


# --- which slice each rank keeps -----------------------------------------------------------------------


def check_tp(cfg: LlamaConfig, tp: int) -> None:
    """Raise unless `tp` ranks can split this architecture evenly."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise TensorParallelError(f"tensor-parallel size must be a positive integer, got {tp!r}")
    sizes = {"n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "ffn_dim": cfg.ffn_dim,
             "vocab_size": cfg.vocab_size}
    bad = [f"{name} {value}" for name, value in sizes.items() if value % tp]
    if bad:
        raise TensorParallelError(f"tensor-parallel size {tp} does not divide {', '.join(bad)} "
                                  f"(n_heads {cfg.n_heads}, n_kv_heads {cfg.n_kv_heads}, ffn_dim {cfg.ffn_dim}, "
                                  f"vocab_size {cfg.vocab_size})")


def split_axis(name: str) -> int | None:
    """0: rows are split (column-parallel, and the vocab-parallel head); 1: columns (row-parallel); None:
    replicated. `name` is a weight's codefill name, or the name of state kept per weight (`adam_m.<name>`)."""
    if name == "output.weight" or name.endswith(_COLUMN_PARALLEL):
        return 0
    if name.endswith(_ROW_PARALLEL):
        return 1
    return None


def shard_tensor(name: str, full: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank `rank`'s slice of the tensor `name` (a view; the whole tensor when it is replicated)."""
    axis = split_axis(name)
    if axis is None or world == 1:
        return full
    if full.shape[axis] % world:
        raise TensorParallelError(f"tensor {name} of shape {tuple(full.shape)} does not split into {world} "
                                  f"along axis {axis}")
    n = full.shape[axis] // world
    index = [slice(None)] * full.ndim
    index[axis] = slice(rank * n, (rank + 1) * n)
    return full[tuple(index)]


def shard_shapes(cfg: LlamaConfig, world: int) -> dict[str, tuple[int, ...]]:
    """Every tensor one rank holds, by codefill name, with its per-rank shape."""
    check_tp(cfg, world)
    out = {}
    for name, shape in expected_shapes(cfg).items():
        axis = split_axis(name)
        out[name] = tuple(s // world if i == axis else s for i, s in enumerate(shape))
    return out


def shard_weights(cfg: LlamaConfig, weights: Mapping[str, np.ndarray], rank: int,
                  world: int) -> dict[str, np.ndarray]:
    """Rank `rank`'s slice of every tensor, as views of `weights` (memory maps stay unread until copied)."""
    check_tp(cfg, world)
    if not 0 <= rank < world:
        raise TensorParallelError(f"rank {rank} out of range [0, {world})")
    return {name: shard_tensor(name, weights[name], rank, world) for name in expected_shapes(cfg)}


# --- the transform -------------------------------------------------------------------------------------


def shard_transformer(model, rank: int, world: int) -> None:
    """Turn a plain Transformer into rank `rank`'s shard, in place, before any weights are loaded: smaller
    projection Cells, per-rank head counts, a per-rank KV cache, collectives where the ranks meet.
    world == 1 leaves it plain."""
    from codefill.model.llama import Linear, kv_cache

    from . import tp_cells

    cfg = model.config
    check_tp(cfg, world)
    if world == 1:
        return
    q_local, kv_local, ffn_local = cfg.n_heads // world, cfg.n_kv_heads // world, cfg.ffn_dim // world
    for layer in model.layers:
        layer.attention_norm = tp_cells.RankInputNorm(cfg.dim, cfg.norm_eps)
        layer.ffn_norm = tp_cells.RankInputNorm(cfg.dim, cfg.norm_eps)
        attn = layer.attention
        attn.n_heads, attn.n_kv_heads = q_local, kv_local  # n_rep and head_dim are unchanged
        attn.wq = Linear(cfg.dim, q_local * cfg.head_dim, cfg.attention_bias)
        attn.wk = Linear(cfg.dim, kv_local * cfg.head_dim, cfg.attention_bias)
        attn.wv = Linear(cfg.dim, kv_local * cfg.head_dim, cfg.attention_bias)
        attn.wo = tp_cells.RowParallelLinear(q_local * cfg.head_dim, cfg.dim)
        attn.cache_k, attn.cache_v = kv_cache(model.max_batch, kv_local, model.max_seq_len, cfg.head_dim)
        ff = layer.feed_forward
        ff.w1 = Linear(cfg.dim, ffn_local)
        ff.w3 = Linear(cfg.dim, ffn_local)
        ff.w2 = tp_cells.RowParallelLinear(ffn_local, cfg.dim)
    model.norm = tp_cells.RankInputNorm(cfg.dim, cfg.norm_eps)
    model.output = tp_cells.VocabParallelHead(cfg.dim, cfg.vocab_size // world, rank, world)
    # Parameters set on an already-built Cell get only their attribute name; give every parameter its full
    # path again so the graph sees unique names (layers.0.attention.wq.weight, ...).
    for name, p in model.parameters_and_names():
        p.name = name


# --- files: full MODEL_DIR or a pre-split directory --------------------------------------------------------


def shard_file_name(rank: int, world: int) -> str:
    return f"rank-{rank:02d}-of-{world:02d}.safetensors"


def read_tp_config(model_dir: str | Path) -> tuple[LlamaConfig, int | None]:
    """(architecture, the TP size a split directory was made for, or None for a full MODEL_DIR)."""
    model_dir = Path(model_dir)
    manifest_path = model_dir / SPLIT_NAME
    if not manifest_path.is_file():
        cfg, _, _ = read_model_config(model_dir)
        return cfg, None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {manifest_path}: {e}") from e
    found = manifest.get("format") if isinstance(manifest, dict) else manifest
    if found != SPLIT_FORMAT:
        raise CheckpointError(f"{manifest_path}: format is {found!r}, expected {SPLIT_FORMAT!r}")
    if manifest.get("version") != SPLIT_VERSION:
        raise CheckpointError(f"{manifest_path}: version {manifest.get('version')!r} is not supported "
                              f"(expected {SPLIT_VERSION})")
    try:
        cfg = LlamaConfig.from_dict(manifest.get("architecture") or {})
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{manifest_path}: architecture: {e}") from e
    tp = manifest.get("tp")
    if not isinstance(tp, int) or tp < 1:
        raise CheckpointError(f"{manifest_path}: tp must be a positive integer, got {tp!r}")
    return cfg, tp


def check_model_dir_for_tp(model_dir: str | Path, tp: int) -> LlamaConfig:
    """What the launchers run before starting any rank: the config reads, `tp` divides it, and a split
    directory was made for this `tp`."""
    cfg, split_tp = read_tp_config(model_dir)
    check_tp(cfg, tp)
    if split_tp is not None and split_tp != tp:
        raise TensorParallelError(f"{model_dir} was split for tensor-parallel size {split_tp}, not {tp}; "
                                  f"split the full MODEL_DIR again with --tp {tp} or run with --tp {split_tp}")
    return cfg


def tokenizer_path(model_dir: str | Path) -> Path:
    """The tokenizer file of a MODEL_DIR or of a split directory (which carries a copy)."""
    cfg, _ = read_tp_config(model_dir)
    path = Path(model_dir) / tokenizer_name(cfg)
    check_vocab(cfg, path, str(model_dir))
    return path


def load_tokenizer(model_dir: str | Path):
    """The tokenizer of a MODEL_DIR or of a split directory, the one its family names (checked)."""
    cfg, _ = read_tp_config(model_dir)
    return open_tokenizer(cfg, tokenizer_path(model_dir))


def split_model_dir(model_dir: str | Path, tp: int, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write `tp` per-rank shard files (stored dtype kept), `split.json` and the tokenizer to `out_dir`,
    atomically. Reads the full checkpoint through memory maps, one rank's slices at a time."""
    model_dir = Path(model_dir)
    files = load_model_dir(model_dir, dtype=None)  # strict checks; memory maps, nothing read yet
    cfg = files.config
    check_tp(cfg, tp)
    manifest = {"format": SPLIT_FORMAT, "version": SPLIT_VERSION, "tp": tp, "architecture": cfg.to_dict(),
                "dtype": files.stored_dtype, "source": str(model_dir.absolute()),
                "files": [shard_file_name(r, tp) for r in range(tp)]}
    with atomic_directory(out_dir, overwrite) as tmp:
        for rank in range(tp):
            write_safetensors(tmp / shard_file_name(rank, tp), shard_weights(cfg, files.weights, rank, tp),
                              {"format": SPLIT_FORMAT, "rank": str(rank), "tp": str(tp)})
        shutil.copyfile(files.tokenizer_path, tmp / tokenizer_name(cfg))
        write_json_synced(tmp / SPLIT_NAME, manifest)
    return Path(out_dir)


def read_rank_shard(split_dir: Path, rank: int, world: int, shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """One rank's tensors from a split directory (memory-mapped, stored dtype), strictly: a missing, extra or
    mis-shaped tensor is a CheckpointError naming it. `shapes` is shard_shapes(cfg, world)."""
    path = split_dir / shard_file_name(rank, world)
    try:
        views = read_safetensors(path)
    except (SafetensorsError, OSError) as e:
        raise CheckpointError(f"rank {rank} of {world}: {e}") from e
    missing, extra = sorted(set(shapes) - set(views)), sorted(set(views) - set(shapes))
    if missing or extra:
        raise CheckpointError(f"{path}: missing tensors {missing[:8]}, unexpected tensors {extra[:8]}")
    for name, shape in shapes.items():
        if tuple(views[name].shape) != shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(views[name].shape)}, "
                                  f"rank {rank} of {world} expects {shape}")
    return views


def load_rank_weights(model_dir: str | Path, rank: int, world: int) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """(full architecture, this rank's float32 shard) from a full MODEL_DIR (cut at load time; world 1 is the
    whole model) or a split directory; strict about names and shapes either way. The weights alone: a rank
    needs no tokenizer (the language server and the worker's stop-rule table check theirs)."""
    model_dir = Path(model_dir)
    cfg = check_model_dir_for_tp(model_dir, world)
    if not 0 <= rank < world:
        raise TensorParallelError(f"rank {rank} out of range [0, {world})")
    shapes = shard_shapes(cfg, world)
    if (model_dir / SPLIT_NAME).is_file():
        views = read_rank_shard(model_dir, rank, world, shapes)
    else:
        try:
            full = read_safetensors(model_dir / WEIGHTS_NAME)
        except SafetensorsError as e:
            raise CheckpointError(str(e)) from e
        check_weights(cfg, full, str(model_dir / WEIGHTS_NAME))  # names, shapes, dtype: reads no data
        views = shard_weights(cfg, full, rank, world)
    return cfg, {name: to_float32(views[name]) for name in shapes}  # copies only the slices


def merge_split_dir(split_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """`codefill merge`: a split directory back to one full MODEL_DIR. Every cut tensor is the concatenation
    of the ranks' slices in rank order along its `split_axis`; replicated tensors must be bit-identical on
    every rank (a difference means the shards do not come from one model, and is refused)."""
    split_dir = Path(split_dir)
    cfg, world = read_tp_config(split_dir)
    if world is None:
        raise TensorParallelError(f"{split_dir} has no {SPLIT_NAME}: it is not a tensor-parallel split directory")
    shapes = shard_shapes(cfg, world)
    shards = [read_rank_shard(split_dir, rank, world, shapes) for rank in range(world)]
    full = {}
    for name in shapes:
        axis, parts = split_axis(name), [np.asarray(s[name]) for s in shards]
        if axis is not None:
            full[name] = np.concatenate(parts, axis=axis)
            continue
        for r, p in enumerate(parts[1:], 1):
            if not np.array_equal(parts[0].view(np.uint8), p.view(np.uint8)):
                raise TensorParallelError(f"replicated tensor {name!r} differs between rank 0 and rank {r} "
                                          f"of {split_dir}")
        full[name] = np.array(parts[0])
    return save_model_dir(out_dir, cfg, full, split_dir / tokenizer_name(cfg),
                          note=f"merged from {world} tensor-parallel shards in {split_dir.absolute()}",
                          overwrite=overwrite)
