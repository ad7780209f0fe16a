"""`codefill train --model MODEL_DIR --data DATA --output OUT`: finetune in graph mode, on one process, on
data-parallel msrun ranks (--dp N) or on tensor-parallel ones (--tp N); each rank calls `train` with its rank
and world size.

One optimiser step:
    rows of the global batch (micro_batch * grad_accum * dp) are picked by a seeded permutation per epoch,
    a pure function of (seed, step): resuming needs nothing but the step number;
    rank r takes its contiguous share; each micro-batch adds the gradient of its summed token loss
    (`optimizer.Accumulate`); `optimizer.Apply` all-reduces, divides by the global batch's labelled-token
    count, clips and takes an AdamW step at the cosine schedule's learning rate.

Tensor parallel (tp_train.py): every rank holds the serving shard of the model (inference_workers/tp.py) and
runs the same rows; the forward and backward are collective, so every rank also runs each held-out
evaluation and each checkpoint's gather, and rank 0 writes. Checkpoints and OUT/model hold full tensors, the
same files as a one-process run; on resume each rank cuts its slices from them.

Outputs in OUT:
    metrics.jsonl      one JSON object per logged step ({"step", "loss", "lr", "grad_norm", "tokens",
                       "tokens_per_s", "elapsed_s"}) and per evaluation ({"step", "held_out_loss"})
    loss.png           the curves (plot_png.py)
    checkpoints/       run_checkpoint.py, the last `keep_last` kept; `resume=True` continues from the newest
    model/             a MODEL_DIR with the final weights (LoRA merged), ready for `codefill serve` / split /
                       convert
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .lora import init_adapters, merge_adapters
from .run_checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .train_config import TrainConfig, cosine_lr
from .train_error import TrainError

MODEL_SUBDIR = "model"


@dataclass
class TrainResult:
    out_dir: Path
    model_dir: Path | None  # None on ranks other than 0
    steps: int
    losses: list[float] = field(default_factory=list)  # train loss of every step this call ran
    held_out: list[tuple[int, float]] = field(default_factory=list)
    tokens_per_s: float = 0.0


# --- data --------------------------------------------------------------------------------------------------


def read_dataset(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """All rows of a MindRecord dataset as (input_ids, labels), int32 [N, L+1]."""
    from .mindrecord_io import read_rows

    ids, labels = [], []
    for row in read_rows(path):
        ids.append(row["input_ids"])
        labels.append(row["labels"])
    if not ids:
        raise TrainError(f"dataset {path} has no rows")
    lengths = {len(r) for r in ids}
    if len(lengths) != 1:
        raise TrainError(f"dataset {path} mixes row lengths {sorted(lengths)}")
    return np.stack(ids).astype(np.int32), np.stack(labels).astype(np.int32)


def split_held_out(ids: np.ndarray, labels: np.ndarray, n: int, seed: int):
    """Hold out n rows (a seeded choice) when no separate held-out dataset is given."""
    if len(ids) < 2 * n:
        n = max(1, len(ids) // 5) if len(ids) > 1 else 0
    perm = np.random.default_rng(seed + 7919).permutation(len(ids))
    held, train = np.sort(perm[:n]), np.sort(perm[n:])
    return (ids[train], labels[train]), (ids[held], labels[held])


def global_batch_rows(n_rows: int, step: int, global_batch: int, seed: int) -> np.ndarray:
    """Row indices of optimiser step `step`: epochs are seeded permutations laid end to end."""
    start = step * global_batch
    out = []
    for g in range(start, start + global_batch):
        epoch, i = divmod(g, n_rows)
        out.append(np.random.default_rng([seed, epoch]).permutation(n_rows)[i])
    return np.array(out, np.int64)


# --- the run -------------------------------------------------------------------------------------------------


def _progress(step: int, total: int, loss: float, tps: float, eta_s: float) -> None:
    width = 24
    done = int(width * step / max(1, total))
    eta = time.strftime("%H:%M:%S", time.gmtime(max(0.0, eta_s)))
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] step {step}/{total} loss {loss:.4f} "
                     f"{tps:,.0f} tok/s ETA {eta}")
    sys.stderr.flush()


def train(model_dir: str | Path, data: str | Path, out_dir: str | Path, cfg: TrainConfig, *,
          held_out_data: str | Path | None = None, resume: bool = False, rank: int = 0, world: int = 1,
          progress: bool = True, stop_after: int | None = None) -> TrainResult:
    """Run (or resume) a finetune; see the module docstring. `stop_after`: return after that many optimiser
    steps in total (as if interrupted), for tests of resume."""
    import mindspore as ms
    from mindspore import Tensor

    from codefill.model.checkpoint import load_model_dir, save_model_dir
    from codefill.model.generate import configure_mindspore
    from codefill.model.llama import Transformer, load_weights, weight_parameters
    from codefill.model.weights import expected_shapes

    from .optimizer import Optimizer
    from .plot_png import plot_losses
    from .tp_train import ShardGatherer, check_train_tp, is_sharded, shard_for_training, shard_state
    from .train_network import language_model_loss, shifted

    if world != cfg.dp * cfg.tp:
        raise TrainError(f"the run has {world} ranks but the config asks for dp {cfg.dp} x tp {cfg.tp}")
    out_dir = Path(out_dir)
    if world == 1:  # ranks configured MindSpore before joining the job (train_rank.py)
        configure_mindspore()
    files = load_model_dir(model_dir)
    arch = files.config
    check_train_tp(cfg, arch)
    tp_rank, dp_rank = rank % cfg.tp, rank // cfg.tp  # the tp ranks of one data shard are adjacent

    ids, labels = read_dataset(data)
    seq_length = ids.shape[1] - 1
    if seq_length != cfg.seq_length:
        cfg = replace(cfg, seq_length=seq_length)  # the data decides; rows were tokenized for it
    if seq_length > arch.max_seq_len:
        raise TrainError(f"rows of {seq_length} positions exceed the model's max_seq_len {arch.max_seq_len}")
    if held_out_data is not None:
        train_set, held_set = (ids, labels), read_dataset(held_out_data)
    else:
        train_set, held_set = split_held_out(ids, labels, cfg.eval_rows, cfg.seed)
    held_set = (held_set[0][:cfg.eval_rows], held_set[1][:cfg.eval_rows])

    model = Transformer(arch, max_batch=1, max_seq_len=seq_length)
    replicated_input = None
    if cfg.tp > 1:
        from codefill.inference_workers.tp import load_shard, shard_weights

        replicated_input = shard_for_training(model, tp_rank, cfg.tp)
        load_shard(model, shard_weights(arch, files.weights, tp_rank, cfg.tp), cfg.tp)
    else:
        load_weights(model, files.weights)
    base_weights = files.weights
    adapters = None
    if cfg.lora is not None:
        adapters = init_adapters(expected_shapes(arch), arch.n_layers, cfg.lora, cfg.seed)
    loss_net = language_model_loss(model, cfg.lora, adapters, replicated_input)
    weights = weight_parameters(model)
    if cfg.lora is None:
        trained = weights
    else:
        for p in weights.values():
            p.requires_grad = False
        trained = {p.name: p for _, p in loss_net.parameters_and_names() if p.name.endswith((".lora_a", ".lora_b"))}
    sharded = frozenset(n for n in trained if cfg.tp > 1 and is_sharded(n))
    opt = Optimizer(loss_net, trained, cfg, cfg.dp, sharded)
    gatherer = ShardGatherer({**trained, **opt.moments()}, cfg.tp) if cfg.tp > 1 else None

    def full_state() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(trained tensors, optimiser state), whole; under TP a collective every rank calls."""
        if gatherer is None:
            return {n: p.asnumpy() for n, p in trained.items()}, opt.state()
        full = gatherer.gather()
        return {n: full[n] for n in trained}, {n: full.get(n, v) for n, v in opt.state().items()}

    start, metrics_lines = 0, 0
    metrics_path = out_dir / "metrics.jsonl"
    ckpt = latest_checkpoint(out_dir) if resume else None
    if ckpt is not None:
        tensors, opt_state, state = load_checkpoint(ckpt)
        saved_cfg = TrainConfig.from_dict(state["config"])
        # full tensors whatever the TP size, so --tp may change; anything else would change the run
        if replace(saved_cfg, max_steps=cfg.max_steps, tp=cfg.tp) != replace(cfg, max_steps=cfg.max_steps):
            raise TrainError(f"checkpoint {ckpt} was made with a different config: {saved_cfg} vs {cfg}")
        if cfg.tp > 1:
            tensors, opt_state = shard_state(tensors, tp_rank, cfg.tp), shard_state(opt_state, tp_rank, cfg.tp)
        if set(tensors) != set(trained):
            raise TrainError(f"checkpoint {ckpt} trained tensors differ from this run's: "
                             f"{sorted(set(tensors) ^ set(trained))[:4]}")
        for name, p in trained.items():
            if tuple(tensors[name].shape) != tuple(p.shape):
                raise TrainError(f"checkpoint {ckpt}: {name} has shape {tensors[name].shape}, expected {p.shape}")
            p.set_data(Tensor(tensors[name]))
        opt.load_state(opt_state)
        start, metrics_lines = int(state["step"]), int(state["metrics_lines"])
    elif not resume and out_dir.exists() and any(out_dir.iterdir()) and rank == 0:
        raise TrainError(f"output {out_dir} exists and is not empty; pass --resume to continue the run in it")
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    if rank == 0 and metrics_path.exists():  # drop what was logged after the checkpoint we resume from
        records = [json.loads(line) for line in metrics_path.read_text().splitlines()[:metrics_lines]]
        _rewrite(metrics_path, records)

    per_rank = cfg.micro_batch * cfg.grad_accum
    n_train = len(train_set[0])
    end = cfg.max_steps if stop_after is None else min(cfg.max_steps, stop_after)
    result = TrainResult(out_dir, None, start)
    t_start, tokens_seen = time.perf_counter(), 0

    def evaluate(step: int) -> None:
        if (rank != 0 and cfg.tp == 1) or not len(held_set[0]):  # under TP the forward is collective
            return
        total, count = 0.0, 0
        for i in range(0, len(held_set[0]), cfg.micro_batch):
            x, y = shifted(held_set[0][i:i + cfg.micro_batch], held_set[1][i:i + cfg.micro_batch])
            if len(x) < cfg.micro_batch:  # keep one compiled shape: pad with unlabelled rows
                pad = cfg.micro_batch - len(x)
                x = np.concatenate([x, np.repeat(x[-1:], pad, 0)])
                y = np.concatenate([y, np.full((pad, y.shape[1]), -100, np.int32)])
            total += float(loss_net(Tensor(x), Tensor(y), Tensor(0.0, ms.float32)).asnumpy())
            count += int((y != -100).sum())
        value = total / max(1, count)
        result.held_out.append((step, value))
        if rank == 0:
            _append(metrics_path, records, {"step": step, "held_out_loss": value})

    final = None  # the final whole weights, when a TP run already gathered them for its last checkpoint
    for step in range(start, end):
        rows = global_batch_rows(n_train, step, cfg.global_batch, cfg.seed)
        x_all, y_all = shifted(train_set[0][rows], train_set[1][rows])
        n_tokens = int((y_all != -100).sum())
        mine = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        x, y = x_all[mine], y_all[mine]
        lr = cosine_lr(cfg, step)
        loss_sum = 0.0
        for m in range(cfg.grad_accum):
            part = slice(m * cfg.micro_batch, (m + 1) * cfg.micro_batch)
            seed = float(1 + ((step * cfg.grad_accum + m) * cfg.dp + dp_rank) % 1_000_003)
            loss_sum += float(opt.accumulate(Tensor(x[part]), Tensor(y[part]), Tensor(seed, ms.float32)).asnumpy())
        total, norm = opt.apply(Tensor(float(max(1, n_tokens)), ms.float32), Tensor(lr, ms.float32),
                                Tensor(loss_sum, ms.float32))
        loss = float(total.asnumpy()) / max(1, n_tokens)
        result.losses.append(loss)
        tokens_seen += int(x_all.size)
        elapsed = time.perf_counter() - t_start
        tps = tokens_seen / max(elapsed, 1e-9)
        done = step + 1
        if rank == 0:
            if cfg.log_every and (done % cfg.log_every == 0 or done == cfg.max_steps):
                _append(metrics_path, records, {"step": done, "loss": loss, "lr": lr, "grad_norm": float(norm.asnumpy()),
                                                "tokens": int(x_all.size), "tokens_per_s": tps, "elapsed_s": elapsed})
            if progress:
                _progress(done, cfg.max_steps, loss, tps, elapsed / (done - start) * (cfg.max_steps - done))
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.max_steps:
            evaluate(done)
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.max_steps or done == end:
            tensors, opt_state = full_state() if gatherer is not None or rank == 0 else ({}, {})
            if gatherer is not None and done == cfg.max_steps:
                final = tensors  # the whole weights (no LoRA under TP): no second gather below
            if rank == 0:
                save_checkpoint(out_dir, done, tensors, opt_state,
                                {"config": cfg.to_dict(), "base_model": str(Path(model_dir).absolute()),
                                 "metrics_lines": len(records)}, cfg.keep_last)
        result.steps = done
    if progress and rank == 0:
        sys.stderr.write("\n")
    result.tokens_per_s = tokens_seen / max(time.perf_counter() - t_start, 1e-9)

    if result.steps == cfg.max_steps and gatherer is not None and final is None:  # resumed at the end: gather
        final = full_state()[0]  # collective: before the rank-0-only part
    if rank == 0:
        plot_losses(out_dir / "loss.png", [(r["step"], r["loss"]) for r in records if "loss" in r],
                    [(r["step"], r["held_out_loss"]) for r in records if "held_out_loss" in r])
        if result.steps == cfg.max_steps:
            if final is None:
                final = {n: p.asnumpy() for n, p in weights.items()}
            if cfg.lora is not None:
                ad = {n: p.asnumpy() for n, p in trained.items()}
                final = merge_adapters(base_weights, ad, arch.n_layers, cfg.lora)
            note = f"finetuned from {Path(model_dir).absolute()} for {cfg.max_steps} steps"
            result.model_dir = save_model_dir(out_dir / MODEL_SUBDIR, arch, final, files.tokenizer_path,
                                              note=note, overwrite=True)
    return result


def _append(path: Path, records: list[dict], record: dict) -> None:
    records.append(record)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _rewrite(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
