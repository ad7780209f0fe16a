"""Tensor parallelism: shard a plain `llama.Transformer` per rank, and drive all ranks from rank 0.

The model file knows nothing of this. A rank builds the plain Transformer from the full config, then
`shard_transformer` replaces its projection Cells with this rank's slices (gpt-fast's tp.py, in MindSpore;
tensor-parallel training, training/tp_train.py, cuts the model with the same functions and then swaps wo, w2
and the head for Cells whose backward is the one training needs):

- column-parallel wq, wk, wv, w1, w3: rank r of N keeps output rows [r*out/N, (r+1)*out/N). For attention
  that is query heads [r*H/N, (r+1)*H/N) and KV heads [r*KV/N, (r+1)*KV/N). Query head h reads KV head h // R
  (R = H / KV), so a rank's query heads need exactly its own KV heads: attention runs with no communication,
  on H/N query and KV/N key/value heads, with a per-rank KV cache [max_batch, KV/N, S, D].
- row-parallel wo, w2: rank r keeps input columns [r*in/N, ...) and computes a partial sum x_r @ W_r^T;
  `RowParallelLinear` all-reduces it (sum) inside the graph, so every rank holds the full residual stream.
  Two all-reduces of [B, T, dim] per layer; nothing else is communicated inside a layer.
- output head: vocab-parallel. Rank r computes logits for vocab rows [r*V/N, ...) and an AllGather puts
  the [B, V] logits together on every rank. On preset "small" (dim 512, vocab 32016) the head is 16.4 M of
  its 41.6 M weights (counted, not timed separately), the biggest single matmul of a decode step; replicating it would leave every
  rank doing the whole of it. Cost: one AllGather of [B, V] per step (B*V*4 bytes: 128 KB at batch 1).
- embedding: replicated. A lookup reads only B*T rows, so sharding it saves no time and would add an
  all-reduce of [B, T, dim] per step (mask the ids outside the rank's range, look up, sum). Memory cost per
  rank: V * dim values (Code Llama 7B: 32016 x 4096 = 131 M = 262 MB in fp16; 34B: 32000 x 8192 = 524 MB),
  i.e. (1 - 1/N) of that more than sharding it; next to a 7B rank's ~13.5 GB / N of other weights that is
  acceptable, and the embedding is the first thing to shard if memory gets tight.
- RMSNorm gains (dim values) and rotary tables are replicated.

N must divide n_heads, n_kv_heads, ffn_dim and vocab_size; `check_tp` says which one does not, and the
launcher calls it before any rank starts. (Code Llama 34B has 8 KV heads: TP up to 8.)

How a step reaches the other ranks: rank 0's `TensorParallelRunner` implements runner.ModelRunner. For each
prefill chunk or decode step it broadcasts one fixed-size int32 message (`Broadcast`, a compiled graph, so it
works across nodes over MindSpore's own collectives; no extra sockets)

    [op, n, slot, start_pos, payload...]   op PREFILL: payload = n token ids (n <= PREFILL_CHUNK)
                                           op DECODE:  payload = max_batch tokens then max_batch positions
                                           op STOP:    the followers return
                                           op STAGE:   payload = a model directory's path, n UTF-8 bytes
                                                       packed 4 to an int32 (little-endian; up to 2 KB)
                                           op COMMIT / DISCARD: switch to the staged weights / drop them

padded to HEADER + max(PREFILL_CHUNK, 2 * max_batch) values (2 KB), so the broadcast graph compiles once.

Reloading weights (`TensorParallelRunner.reload`, between steps, with no request active): rank 0 broadcasts
STAGE with the path (every rank reads the same shared path: ranks on one host, or a filesystem all hosts
mount; the int32 plan carries it, so no file or socket is added). Each rank loads its shard into a staging
dict beside the live weights (`load_rank_weights`: strict names, shapes, TP size; and the same architecture)
and reports ok or its error; an AllGather of those reports is the barrier after which every rank knows
whether all of them loaded. Rank 0 then broadcasts COMMIT (every rank copies its staged shard into the
model's Parameters; the graphs are kept) or DISCARD (a rank failed: nothing changes anywhere, and rank 0
raises TensorParallelError naming the ranks and their errors). A follower's load error is reported, never
raised, so a bad checkpoint cannot kill a rank; the next step runs on one set of weights on every rank
because each rank handles COMMIT before the next step's message.
Then rank 0 runs its own shard; the collectives inside the graph keep the ranks in step. Followers loop in
`follow` until STOP (`close()`). Requests are checked on rank 0 before anything is broadcast, so a bad one
raises `GenerationError` there (as LocalRunner does) and the followers never see it. A follower that fails
raises and its process dies; rank 0 then blocks in the next collective, which is why the launcher watches
every rank's process and kills the job (launch.py), and why the engine runs steps under a watchdog.

Weights: a rank reads only its shard. From a full MODEL_DIR the safetensors file is memory-mapped and each
tensor sliced before conversion (`shard_weights`), so a rank copies only its 1/N of the column- and
row-parallel tensors (the strided column slices of wo/w2 read through the page cache, shared by all ranks
of a node). Or `split_model_dir` writes one file per rank plus `split.json` (tp size, full architecture,
stored dtype); loading a split made for another TP size is a `TensorParallelError` naming both sizes.
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from codefill.model.checkpoint import (
    CONFIG_NAME,
    TOKENIZER_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    atomic_directory,
    check_vocab,
    check_weights,
    read_model_config,
    write_json_synced,
)
from codefill.model.config import ConfigError, LlamaConfig
from codefill.model.generate import PREFILL_CHUNK, GenerationError, check_decode, check_prefill
from codefill.model.safetensors_io import SafetensorsError, read_safetensors, to_float32, write_safetensors
from codefill.model.weights import expected_shapes

SPLIT_FORMAT, SPLIT_VERSION, SPLIT_NAME = "codefill-tp-split", 1, "split.json"

# The int32 message rank 0 broadcasts before every step.
HEADER = 4  # op, n, slot, start_pos
OP_PREFILL, OP_DECODE, OP_STOP = 1, 2, 3
OP_STAGE, OP_COMMIT, OP_DISCARD = 4, 5, 6
STATUS_LEN = 256  # one rank's reload report in the AllGather: [ok, then up to 255 bytes of its error]

# Which tensors are cut, and along which axis of the [out, in] weight.
_COLUMN_PARALLEL = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                    "feed_forward.w1.weight", "feed_forward.w3.weight")  # rows: output features
_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")  # columns: input features


class TensorParallelError(ValueError):
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
    replicated."""
    if name == "output.weight" or name.endswith(_COLUMN_PARALLEL):
        return 0
    if name.endswith(_ROW_PARALLEL):
        return 1
    return None


def shard_shapes(cfg: LlamaConfig, world: int) -> dict[str, tuple[int, ...]]:
    """Every tensor one rank holds, by codefill name, with its per-rank shape."""
    check_tp(cfg, world)
    out = {}
    for name, shape in expected_shapes(cfg).items():
        axis = split_axis(name)
        if axis is not None:
            shape = tuple(s // world if i == axis else s for i, s in enumerate(shape))
        out[name] = shape
    return out


def shard_weights(cfg: LlamaConfig, weights: Mapping[str, np.ndarray], rank: int,
                  world: int) -> dict[str, np.ndarray]:
    """Rank `rank`'s slice of every tensor, as views of `weights` (memory maps stay unread until copied)."""
    shapes = shard_shapes(cfg, world)
    if not 0 <= rank < world:
        raise TensorParallelError(f"rank {rank} out of range [0, {world})")
    out = {}
    for name, shape in shapes.items():
        axis, full = split_axis(name), weights[name]
        if axis is None:
            out[name] = full
            continue
        n = shape[axis]
        index = [slice(None)] * full.ndim
        index[axis] = slice(rank * n, (rank + 1) * n)
        out[name] = full[tuple(index)]
    return out


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
    if not isinstance(manifest, dict) or manifest.get("format") != SPLIT_FORMAT:
        raise CheckpointError(f"{manifest_path}: format is {manifest.get('format') if isinstance(manifest, dict) else manifest!r}, "
                              f"expected {SPLIT_FORMAT!r}")
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
    """What the launcher runs before starting any rank: the config reads, `tp` divides it, and a split
    directory was made for this `tp`."""
    cfg, split_tp = read_tp_config(model_dir)
    check_tp(cfg, tp)
    if split_tp is not None and split_tp != tp:
        raise TensorParallelError(f"{model_dir} was split for tensor-parallel size {split_tp}, not {tp}; "
                                  f"split the full MODEL_DIR again with --tp {tp} or run with --tp {split_tp}")
    return cfg


def tokenizer_path(model_dir: str | Path) -> Path:
    """The tokenizer of a MODEL_DIR or of a split directory (which carries a copy)."""
    cfg, _ = read_tp_config(model_dir)
    path = Path(model_dir) / TOKENIZER_NAME
    check_vocab(cfg, path, str(model_dir))
    return path


def split_model_dir(model_dir: str | Path, tp: int, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write `tp` per-rank shard files (stored dtype kept), `split.json` and the tokenizer to `out_dir`,
    atomically. Reads the full checkpoint through memory maps, one rank's slices at a time."""
    model_dir = Path(model_dir)
    cfg, stored, _ = read_model_config(model_dir)
    check_tp(cfg, tp)
    check_vocab(cfg, model_dir / TOKENIZER_NAME, str(model_dir))
    try:
        full = read_safetensors(model_dir / WEIGHTS_NAME)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from e
    check_weights(cfg, full, str(model_dir / WEIGHTS_NAME))
    manifest = {"format": SPLIT_FORMAT, "version": SPLIT_VERSION, "tp": tp, "architecture": cfg.to_dict(),
                "dtype": stored, "source": str(model_dir.absolute()),
                "files": [shard_file_name(r, tp) for r in range(tp)]}
    with atomic_directory(out_dir, overwrite) as tmp:
        for rank in range(tp):
            shard = shard_weights(cfg, full, rank, tp)
            write_safetensors(tmp / shard_file_name(rank, tp), shard,
                              {"format": SPLIT_FORMAT, "rank": str(rank), "tp": str(tp)})
        shutil.copyfile(model_dir / TOKENIZER_NAME, tmp / TOKENIZER_NAME)
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
    """(full architecture, this rank's float32 shard) from a full MODEL_DIR (cut at load time) or a split
    directory; strict about names and shapes either way."""
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


# --- the sharded model ------------------------------------------------------------------------------------


@functools.cache
def _parallel_cells():
    """(RowParallelLinear, VocabParallelHead): MindSpore Cells, defined on first use so that the launcher can
    import this module (check_tp) without importing MindSpore."""
    import mindspore as ms
    from mindspore import Parameter, nn, ops
    from mindspore.common.initializer import initializer

    class RowParallelLinear(nn.Cell):
        """y = all_reduce_sum(x_r @ W_r^T): W_r [out, in/N] is this rank's columns, x_r [..., in/N] the matching
        slice of the activations (what the column-parallel layer before it produced)."""

        def __init__(self, in_features: int, out_features: int):
            super().__init__()
            self.weight = Parameter(initializer("zeros", (out_features, in_features), ms.float32), name="weight")
            self.matmul = ops.MatMul(transpose_b=True)
            self.all_reduce = ops.AllReduce()  # sum over the world group
            self.out_features = out_features

        def construct(self, x):
            lead = x.shape[:-1]
            y = self.matmul(x.reshape(-1, x.shape[-1]), self.weight)  # [N, out], a partial sum
            return self.all_reduce(y).reshape(lead + (self.out_features,))

    class VocabParallelHead(nn.Cell):
        """logits [B, V] = AllGather over ranks of x @ W_r^T, W_r [V/N, dim] this rank's vocabulary rows."""

        def __init__(self, dim: int, vocab_local: int, world: int):
            super().__init__()
            self.weight = Parameter(initializer("zeros", (vocab_local, dim), ms.float32), name="weight")
            self.matmul = ops.MatMul(transpose_b=True)
            self.all_gather = ops.AllGather()  # concatenates along axis 0 in rank order
            self.vocab_local, self.world = vocab_local, world

        def construct(self, x):
            b = x.shape[0]
            parts = self.all_gather(self.matmul(x, self.weight))  # [N*B, V/N], rank-major
            return parts.reshape(self.world, b, self.vocab_local).transpose(1, 0, 2).reshape(b, -1)

    return RowParallelLinear, VocabParallelHead


def shard_transformer(model, rank: int, world: int) -> None:
    """Turn a plain Transformer into rank `rank`'s shard, in place, before any weights are loaded: smaller
    projection Cells, per-rank head counts, a per-rank KV cache. world == 1 leaves it plain."""
    from mindspore import Parameter, Tensor

    from codefill.model.llama import Linear

    cfg = model.config
    check_tp(cfg, world)
    if world == 1:
        return
    row_parallel, vocab_head = _parallel_cells()
    q_local, kv_local, ffn_local = cfg.n_heads // world, cfg.n_kv_heads // world, cfg.ffn_dim // world
    cache_shape = (model.max_batch, kv_local, model.max_seq_len + 1, cfg.head_dim)
    for layer in model.layers:
        attn = layer.attention
        attn.n_heads, attn.n_kv_heads = q_local, kv_local  # n_rep and head_dim are unchanged
        attn.wq = Linear(cfg.dim, q_local * cfg.head_dim)
        attn.wk = Linear(cfg.dim, kv_local * cfg.head_dim)
        attn.wv = Linear(cfg.dim, kv_local * cfg.head_dim)
        attn.wo = row_parallel(q_local * cfg.head_dim, cfg.dim)
        attn.cache_k = Parameter(Tensor(np.zeros(cache_shape, np.float32)), name="cache_k", requires_grad=False)
        attn.cache_v = Parameter(Tensor(np.zeros(cache_shape, np.float32)), name="cache_v", requires_grad=False)
        ff = layer.feed_forward
        ff.w1 = Linear(cfg.dim, ffn_local)
        ff.w3 = Linear(cfg.dim, ffn_local)
        ff.w2 = row_parallel(ffn_local, cfg.dim)
    model.output = vocab_head(cfg.dim, cfg.vocab_size // world, world)
    # Parameters set on an already-built Cell get only their attribute name; give every parameter its full
    # path again so the graph sees unique names (layers.0.attention.wq.weight, ...).
    for name, p in model.parameters_and_names():
        p.name = name


def load_shard(model, weights: Mapping[str, np.ndarray], world: int) -> None:
    """Copy a rank's {name: array} shard into a sharded model, strictly (names and per-rank shapes)."""
    from mindspore import Tensor

    from codefill.model.llama import weight_parameters

    params = weight_parameters(model)
    shapes = shard_shapes(model.config, world)
    if set(params) != set(shapes):
        raise TensorParallelError(f"sharded model parameters differ from shard_shapes: "
                                  f"{sorted(set(params) ^ set(shapes))[:8]}")
    missing, extra = sorted(set(shapes) - set(weights)), sorted(set(weights) - set(shapes))
    if missing or extra:
        raise TensorParallelError(f"shard does not match the model: missing {missing[:8]}, unexpected {extra[:8]}")
    for name, p in params.items():
        if tuple(p.shape) != shapes[name] or tuple(weights[name].shape) != shapes[name]:
            raise TensorParallelError(f"tensor {name}: parameter {tuple(p.shape)}, shard {tuple(weights[name].shape)}, "
                                      f"expected {shapes[name]} for {world} ranks")
        p.set_data(Tensor(np.ascontiguousarray(weights[name], dtype=np.float32)))


class RankModel:
    """One rank's shard with its KV cache and two compiled graphs (prefill, one dynamic-length chunk; decode,
    one token per slot), like generate.Generator but unchecked: the runner on rank 0 checks requests.
    The caller sets MindSpore up first (graph mode, device: generate.configure_mindspore, before init())."""

    def __init__(self, config: LlamaConfig, weights: Mapping[str, np.ndarray], rank: int, world: int,
                 max_seq_len: int, max_batch: int):
        from codefill.model import llama

        if not 0 < max_seq_len <= config.max_seq_len:
            raise GenerationError(f"max_seq_len {max_seq_len} must be in [1, {config.max_seq_len}]")
        if max_batch < 1:
            raise GenerationError(f"max_batch must be >= 1, got {max_batch}")
        self.config, self.rank, self.world = config, rank, world
        self.max_seq_len, self.max_batch = max_seq_len, max_batch
        self.kv_local = config.n_kv_heads // world
        self.model = llama.Transformer(config, max_batch=max_batch, max_seq_len=max_seq_len)
        shard_transformer(self.model, rank, world)
        load_shard(self.model, weights, world)
        self._prefill, self._decode = self._graphs()
        self._cache_index = llama.cache_index
        self._staged: dict[str, np.ndarray] | None = None  # a reload's shard, between STAGE and COMMIT

    def _graphs(self):
        from codefill.model.generate import graph_cells

        return graph_cells(self.model, self.kv_local)  # the same two graphs as one process, on this rank's heads

    def compiled_graphs(self) -> dict[str, int]:
        return {"prefill": len(self._prefill.compile_cache), "decode": len(self._decode.compile_cache)}

    def stage(self, model_dir: str) -> None:
        """Load this rank's shard of `model_dir` beside the live weights, checked; raises and keeps nothing
        staged if it does not load or does not fit the serving architecture."""
        from codefill.inference_workers.runner import check_same_architecture

        self._staged = None
        cfg, weights = load_rank_weights(model_dir, self.rank, self.world)
        check_same_architecture(self.config, cfg, f"{model_dir} (rank {self.rank} of {self.world})")
        self._staged = weights

    def commit(self) -> None:
        staged, self._staged = self._staged, None
        if staged is None:
            raise TensorParallelError(f"rank {self.rank}: COMMIT without staged weights")
        load_shard(self.model, staged, self.world)

    def discard(self) -> None:
        self._staged = None

    def prefill_chunk(self, ids: np.ndarray, slot: int, first: int) -> np.ndarray:
        """ids int32 [T] at positions first.. of `slot` -> logits [V] of the last one."""
        from mindspore import Tensor

        positions = np.arange(first, first + len(ids), dtype=np.int32)[None]  # [1, T]
        idx = self._cache_index(np.array([slot]), positions, self.kv_local)  # [1, T, KV/N, 3]
        key_positions = np.arange(first + len(ids), dtype=np.int32)
        logits = self._prefill(Tensor(ids[None]), Tensor(positions), Tensor(idx),
                               Tensor(np.array([slot], np.int32)), Tensor(key_positions))
        return logits.asnumpy()[0]

    def decode_step(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """tokens, positions int32 [max_batch] -> logits [max_batch, V]."""
        from mindspore import Tensor

        pos = positions.astype(np.int32)[:, None]
        idx = self._cache_index(np.arange(self.max_batch), pos, self.kv_local)
        return self._decode(Tensor(tokens.astype(np.int32)[:, None]), Tensor(pos), Tensor(idx)).asnumpy()


# --- rank 0 -> other ranks -----------------------------------------------------------------------------


class Channel:
    """One fixed-size int32 message from rank 0 to every rank per step, over a compiled Broadcast graph."""

    def __init__(self, rank: int, max_batch: int):
        import mindspore as ms
        from mindspore import nn, ops

        class _Broadcast(nn.Cell):
            def __init__(self):
                super().__init__()
                self.broadcast = ops.Broadcast(0)

            def construct(self, x):
                return self.broadcast((x,))[0]

        self.rank = rank
        self.size = HEADER + max(PREFILL_CHUNK, 2 * max_batch)
        self._cell = _Broadcast()
        self._ms = ms

    def send(self, op: int, n: int, slot: int, start_pos: int, payload: np.ndarray) -> None:
        if self.rank != 0:
            raise TensorParallelError(f"only rank 0 sends steps; this is rank {self.rank}")
        msg = np.zeros(self.size, np.int32)
        msg[:HEADER] = (op, n, slot, start_pos)
        msg[HEADER:HEADER + len(payload)] = payload
        self._cell(self._ms.Tensor(msg)).asnumpy()  # wait until it has left

    def receive(self) -> np.ndarray:
        return self._cell(self._ms.Tensor(np.zeros(self.size, np.int32))).asnumpy()

    def gather(self, status: np.ndarray) -> np.ndarray:
        """Every rank's float32 [STATUS_LEN] report -> [world, STATUS_LEN] on every rank (a barrier).
        The graph is built on first use: every rank calls this at the same point (after STAGE)."""
        if getattr(self, "_gather", None) is None:
            from mindspore import nn, ops

            class _AllGather(nn.Cell):
                def __init__(self):
                    super().__init__()
                    self.all_gather = ops.AllGather()

                def construct(self, x):
                    return self.all_gather(x)

            self._gather = _AllGather()
        return self._gather(self._ms.Tensor(status.reshape(1, -1).astype(np.float32))).asnumpy()


def encode_path(path: str, capacity: int) -> tuple[int, np.ndarray]:
    """(byte length, int32 payload) of a path for a STAGE message with `capacity` payload values."""
    raw = path.encode("utf-8")
    if not raw or len(raw) > 4 * capacity:
        raise TensorParallelError(f"model directory path of {len(raw)} bytes does not fit a step message "
                                  f"(1 to {4 * capacity} bytes): {path[:80]!r}")
    return len(raw), np.frombuffer(raw + b"\0" * (-len(raw) % 4), dtype="<i4").astype(np.int32)


def decode_path(payload: np.ndarray, n: int) -> str:
    return payload.astype("<i4").tobytes()[:n].decode("utf-8")


def reload_status(error: str | None) -> np.ndarray:
    """One rank's report: [1, 0...] loaded, or [0, the error's first UTF-8 bytes...]."""
    out = np.zeros(STATUS_LEN, np.float32)
    if error is None:
        out[0] = 1.0
    else:
        raw = error.encode("utf-8")[:STATUS_LEN - 1]
        out[1:1 + len(raw)] = np.frombuffer(raw, np.uint8)
    return out


def reload_failures(statuses: np.ndarray) -> list[str]:
    """'rank R: error' for every rank whose report in the gathered [world, STATUS_LEN] is not ok."""
    failed = []
    for rank, row in enumerate(statuses):
        if row[0] != 1.0:
            text = bytes(row[1:].astype(np.uint8)).rstrip(b"\0").decode("utf-8", "replace")
            failed.append(f"rank {rank} of {len(statuses)}: {text}")
    return failed


def _stage(model: RankModel, model_dir: str) -> str | None:
    """Stage on this rank; the error as text instead of an exception (a follower must stay alive)."""
    try:
        model.stage(model_dir)
        return None
    except Exception as e:  # noqa: BLE001 - any load failure is a refusal; the live weights are untouched
        return f"{type(e).__name__}: {e}"


def follow(model: RankModel, channel: Channel) -> int:
    """A follower rank's loop: run each step rank 0 broadcasts, until STOP. Returns the number of steps."""
    steps = 0
    while True:
        msg = channel.receive()
        op, n, slot, start_pos = (int(v) for v in msg[:HEADER])
        if op == OP_STOP:
            return steps
        if op == OP_PREFILL:
            model.prefill_chunk(msg[HEADER:HEADER + n], slot, start_pos)
        elif op == OP_DECODE:
            b = model.max_batch
            model.decode_step(msg[HEADER:HEADER + b], msg[HEADER + b:HEADER + 2 * b])
        elif op == OP_STAGE:
            error = _stage(model, decode_path(msg[HEADER:], n))
            if error is not None:
                print(f"codefill rank {model.rank}: cannot stage new weights: {error}", file=sys.stderr, flush=True)
            channel.gather(reload_status(error))
        elif op == OP_COMMIT:
            model.commit()
        elif op == OP_DISCARD:
            model.discard()
        else:
            raise TensorParallelError(f"rank {model.rank}: unknown op {op} in step message {msg[:HEADER].tolist()}")
        steps += 1


class TensorParallelRunner:
    """runner.ModelRunner over all ranks, on rank 0. With world 1 it runs the plain model, broadcasting nothing.

    Not thread-safe: call it from one thread at a time (the engine's model thread)."""

    def __init__(self, model: RankModel, channel: Channel | None):
        if model.rank != 0:
            raise TensorParallelError(f"the runner lives on rank 0, not rank {model.rank}")
        if (channel is None) != (model.world == 1):
            raise TensorParallelError(f"a channel is needed exactly when there are other ranks (world {model.world})")
        self.model, self.channel = model, channel
        self.world = model.world
        self.max_batch, self.max_seq_len = model.max_batch, model.max_seq_len
        self.vocab_size = model.config.vocab_size
        self.idle_position = model.max_seq_len  # the scratch cache column
        self.prefill_chunk = PREFILL_CHUNK
        self.closed = False
        self.busy = False  # inside a step: set while the ranks may be inside a collective

    def prefill(self, ids: Sequence[int], slot: int, start_pos: int) -> np.ndarray:
        ids = check_prefill(ids, slot, start_pos, vocab_size=self.vocab_size, max_batch=self.max_batch,
                            max_seq_len=self.max_seq_len)
        self.busy = True
        for begin in range(0, len(ids), self.prefill_chunk):  # chunks, as Generator.prefill does
            chunk = ids[begin:begin + self.prefill_chunk]
            self._send(OP_PREFILL, len(chunk), slot, start_pos + begin, chunk)
            logits = self.model.prefill_chunk(chunk, slot, start_pos + begin)
        self.busy = False
        return logits

    def decode_step(self, tokens: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        tokens, pos = check_decode(tokens, positions, vocab_size=self.vocab_size, max_batch=self.max_batch,
                                   max_seq_len=self.max_seq_len)
        self.busy = True
        self._send(OP_DECODE, self.max_batch, 0, 0, np.concatenate([tokens, pos]))
        logits = self.model.decode_step(tokens, pos)
        self.busy = False
        return logits

    def reload(self, model_dir: str) -> str:
        """Switch every rank to the weights of `model_dir`, or raise TensorParallelError / CheckpointError
        and change none (see the module docstring: STAGE, AllGather of the reports, COMMIT or DISCARD)."""
        path = str(model_dir)
        capacity = self.channel.size - HEADER if self.channel is not None else 1 << 20
        n, payload = encode_path(path, capacity)
        self.busy = True
        self._send(OP_STAGE, n, 0, 0, payload)
        error = _stage(self.model, path)
        status = reload_status(error)
        statuses = self.channel.gather(status) if self.channel is not None else status.reshape(1, -1)
        failures = reload_failures(statuses)
        if failures:
            self._send(OP_DISCARD, 0, 0, 0, np.zeros(0, np.int32))
            self.model.discard()
            self.busy = False
            raise TensorParallelError(f"not switched to {path}: {'; '.join(failures)}")
        self._send(OP_COMMIT, 0, 0, 0, np.zeros(0, np.int32))
        self.model.commit()
        self.busy = False
        return f"serving {path} on {self.world} rank(s)"

    def warm_up(self) -> None:
        """Compile both graphs on every rank, writing only the scratch column of slot 0."""
        one = np.zeros(1, np.int32)
        self._send(OP_PREFILL, 1, 0, self.idle_position, one)
        self.model.prefill_chunk(one, 0, self.idle_position)
        idle = np.full(self.max_batch, self.idle_position, np.int32)
        self._send(OP_DECODE, self.max_batch, 0, 0, np.concatenate([np.zeros(self.max_batch, np.int32), idle]))
        self.model.decode_step(np.zeros(self.max_batch, np.int32), idle)

    def compiled_graphs(self) -> dict[str, int]:
        return self.model.compiled_graphs()

    def close(self) -> None:
        """Tell the other ranks to return from `follow`. Idempotent."""
        if not self.closed:
            self.closed = True
            self._send(OP_STOP, 0, 0, 0, np.zeros(0, np.int32))

    def _send(self, op: int, n: int, slot: int, start_pos: int, payload: np.ndarray) -> None:
        if self.closed and op != OP_STOP:
            raise TensorParallelError("the tensor-parallel runner is closed; the other ranks have stopped")
        if self.channel is not None:
            self.channel.send(op, n, slot, start_pos, payload)
