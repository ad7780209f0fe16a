"""`codefill train --model MODEL_DIR --data DATA --output OUT`: finetune in graph mode, on one process, on
data-parallel msrun ranks (--dp N) or on tensor-parallel ones (--tp N); each rank calls `train` with its rank
and world size.

One optimiser step:
    rows of the global batch (micro_batch * grad_accum * dp) are picked by a seeded permutation per epoch,
    a pure function of (seed, step): resuming needs nothing but the step number;
    rank r takes its contiguous share; each micro-batch adds the gradient of its summed token loss
    (`optimizer.Accumulate`); `optimizer.Apply` all-reduces, divides by the global batch's labelled-token
    count, clips and takes an AdamW step at the cosine schedule's learning rate.

Tensor parallel (tp_train.py): every rank holds the serving shard of the model (inference_workers/sharding.py) and
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
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .batch_order import global_batch_rows
from .lora import init_adapters, merge_adapters
from .run_checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .train_config import TrainConfig, check_train_tp, cosine_lr
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


# --- the run -------------------------------------------------------------------------------------------------


def train(model_dir: str | Path, data: str | Path, out_dir: str | Path, cfg: TrainConfig, *,
          held_out_data: str | Path | None = None, resume: bool = False, rank: int = 0, world: int = 1,
          progress: bool = True, stop_after: int | None = None, device: str = "cpu") -> TrainResult:
    """Run (or resume) a finetune; see the module docstring. `stop_after`: return after that many optimiser
    steps in total (as if interrupted), for tests of resume. device: where a one-rank run trains (ranks of
    several configured theirs before joining the job)."""
    from codefill.model.checkpoint import load_model_dir
    from codefill.model.device import configure_mindspore

    if world != cfg.dp * cfg.tp:
        raise TrainError(f"the run has {world} ranks but the config asks for dp {cfg.dp} x tp {cfg.tp}")
    if world == 1:  # ranks configured MindSpore before joining the job (train_rank.py)
        configure_mindspore(device)
    files = load_model_dir(model_dir)
    check_train_tp(cfg, files.config)
    ids, labels = read_dataset(data)
    seq_length = ids.shape[1] - 1
    if seq_length != cfg.seq_length:
        cfg = replace(cfg, seq_length=seq_length)  # the data decides; rows were tokenized for it
    if seq_length > files.config.max_seq_len:
        raise TrainError(f"rows of {seq_length} positions exceed the model's max_seq_len {files.config.max_seq_len}")
    if held_out_data is not None:
        train_set, held_set = (ids, labels), read_dataset(held_out_data)
    else:
        train_set, held_set = split_held_out(ids, labels, cfg.eval_rows, cfg.seed)
    held_set = (held_set[0][:cfg.eval_rows], held_set[1][:cfg.eval_rows])

    run = _Run(model_dir, files, Path(out_dir), cfg, rank)
    start = run.restore(resume)
    end = cfg.max_steps if stop_after is None else min(cfg.max_steps, stop_after)
    result = TrainResult(run.out_dir, None, start)
    bar = _progress_bar(cfg.max_steps, start, enabled=progress and rank == 0)
    t_start, tokens_seen = time.perf_counter(), 0
    for step in range(start, end):
        loss, tokens = run.step(step, train_set, tokens_seen, t_start)
        tokens_seen += tokens
        result.losses.append(loss)
        done = result.steps = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_seen / max(time.perf_counter() - t_start, 1e-9):,.0f}")
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.max_steps:
            run.evaluate(done, held_set, result)
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.max_steps or done == end:
            run.save(done)
    bar.close()
    result.tokens_per_s = tokens_seen / max(time.perf_counter() - t_start, 1e-9)
    result.model_dir = run.finish(result.steps)
    return result


@dataclass
class TrainingNetwork:
    model: object  # llama.Transformer, transformed (tensor-parallel shard, LoRA adapters)
    weights: dict  # the model's weight Parameters by codefill name
    trained: dict  # the Parameters the optimiser updates: the weights, or LoRA's adapters
    loss_net: object  # train_network.LanguageModelLoss over the model


def training_network(arch, weights: dict[str, np.ndarray], cfg: TrainConfig, tp_rank: int = 0) -> TrainingNetwork:
    """The one model with `weights` loaded and the run's transforms applied: this rank's tensor-parallel shard
    (cfg.tp > 1), then LoRA adapters (cfg.lora) with the base weights frozen; and its loss Cell."""
    from codefill.inference_workers.sharding import shard_shapes, shard_transformer, shard_weights
    from codefill.model.llama import Transformer, load_weights, weight_parameters
    from codefill.model.weights import expected_shapes

    from .lora import apply_lora
    from .train_network import LanguageModelLoss

    model = Transformer(arch, max_batch=1, max_seq_len=cfg.seq_length)
    shard_transformer(model, tp_rank, cfg.tp)  # plain at tp 1
    load_weights(model, shard_weights(arch, weights, tp_rank, cfg.tp), shard_shapes(arch, cfg.tp))
    params = weight_parameters(model)
    trained, lora_seed = params, None
    if cfg.lora is not None:
        for p in params.values():
            p.requires_grad = False
        adapters = init_adapters(expected_shapes(arch), arch.n_layers, cfg.lora, cfg.seed)
        trained, lora_seed = apply_lora(model, cfg.lora, adapters)
    return TrainingNetwork(model, params, trained, LanguageModelLoss(model, lora_seed))


def _progress_bar(total: int, start: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)


class _Run:
    """One rank's model, loss, optimiser and outputs; under TP every method but the file writes is
    collective (every rank calls it at the same point)."""

    def __init__(self, model_dir: str | Path, files, out_dir: Path, cfg: TrainConfig, rank: int):
        from .optimizer import Optimizer
        from .tp_train import ShardGatherer, is_sharded

        self.model_dir, self.files, self.out_dir, self.cfg, self.rank = model_dir, files, out_dir, cfg, rank
        self.tp_rank, self.dp_rank = rank % cfg.tp, rank // cfg.tp  # the tp ranks of one data shard are adjacent
        net = training_network(files.config, files.weights, cfg, self.tp_rank)
        self.weights, self.trained, self.loss_net = net.weights, net.trained, net.loss_net
        sharded = frozenset(n for n in self.trained if cfg.tp > 1 and is_sharded(n))
        self.opt = Optimizer(self.loss_net, self.trained, cfg, cfg.dp, sharded)
        self.gatherer = ShardGatherer({**self.trained, **self.opt.moments()}, cfg.tp) if cfg.tp > 1 else None
        self.final: dict[str, np.ndarray] | None = None  # whole final weights once a TP run gathered them
        self.metrics_path = out_dir / "metrics.jsonl"
        self.records: list[dict] = []

    def full_state(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(trained tensors, optimiser state), whole; under TP a collective every rank calls."""
        if self.gatherer is None:
            return {n: p.asnumpy() for n, p in self.trained.items()}, self.opt.state()
        full = self.gatherer.gather()
        return {n: full[n] for n in self.trained}, {n: full.get(n, v) for n, v in self.opt.state().items()}

    def restore(self, resume: bool) -> int:
        """Continue from the newest checkpoint when resuming; returns the step to start from."""
        from mindspore import Tensor

        from .tp_train import shard_state

        cfg, start, metrics_lines = self.cfg, 0, 0
        ckpt = latest_checkpoint(self.out_dir) if resume else None
        if ckpt is not None:
            tensors, opt_state, state = load_checkpoint(ckpt)
            saved_cfg = TrainConfig.from_dict(state["config"])
            # full tensors whatever the TP size, so --tp may change; anything else would change the run
            if replace(saved_cfg, max_steps=cfg.max_steps, tp=cfg.tp) != replace(cfg, max_steps=cfg.max_steps):
                raise TrainError(f"checkpoint {ckpt} was made with a different config: {saved_cfg} vs {cfg}")
            if cfg.tp > 1:
                tensors = shard_state(tensors, self.tp_rank, cfg.tp)
                opt_state = shard_state(opt_state, self.tp_rank, cfg.tp)
            if set(tensors) != set(self.trained):
                raise TrainError(f"checkpoint {ckpt} trained tensors differ from this run's: "
                                 f"{sorted(set(tensors) ^ set(self.trained))[:4]}")
            for name, p in self.trained.items():
                if tuple(tensors[name].shape) != tuple(p.shape):
                    raise TrainError(f"checkpoint {ckpt}: {name} has shape {tensors[name].shape}, expected {p.shape}")
                p.set_data(Tensor(tensors[name]))
            self.opt.load_state(opt_state)
            start, metrics_lines = int(state["step"]), int(state["metrics_lines"])
        elif not resume and self.out_dir.exists() and any(self.out_dir.iterdir()) and self.rank == 0:
            raise TrainError(f"output {self.out_dir} exists and is not empty; pass --resume to continue the run in it")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0 and self.metrics_path.exists():  # drop what was logged after that checkpoint
            self.records = [json.loads(line) for line in self.metrics_path.read_text().splitlines()[:metrics_lines]]
            _rewrite(self.metrics_path, self.records)
        return start

    def step(self, step: int, train_set, tokens_before: int, t_start: float) -> tuple[float, int]:
        """One optimiser step; returns (its loss per labelled token, the tokens of its global batch)."""
        import mindspore as ms
        from mindspore import Tensor

        cfg = self.cfg
        from .train_network import shifted

        rows = global_batch_rows(len(train_set[0]), step, cfg.global_batch, cfg.seed)
        x_all, y_all = shifted(train_set[0][rows], train_set[1][rows])
        n_tokens = int((y_all != -100).sum())
        per_rank = cfg.micro_batch * cfg.grad_accum
        mine = slice(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank)
        x, y = x_all[mine], y_all[mine]
        lr = cosine_lr(cfg, step)
        loss_sum = 0.0
        for m in range(cfg.grad_accum):
            part = slice(m * cfg.micro_batch, (m + 1) * cfg.micro_batch)
            seed = float(1 + ((step * cfg.grad_accum + m) * cfg.dp + self.dp_rank) % 1_000_003)
            loss_sum += float(self.opt.accumulate(Tensor(x[part]), Tensor(y[part]), Tensor(seed, ms.float32)).asnumpy())
        total, norm = self.opt.apply(Tensor(float(max(1, n_tokens)), ms.float32), Tensor(lr, ms.float32),
                                     Tensor(loss_sum, ms.float32))
        loss = float(total.asnumpy()) / max(1, n_tokens)
        done = step + 1
        if self.rank == 0 and cfg.log_every and (done % cfg.log_every == 0 or done == cfg.max_steps):
            elapsed = time.perf_counter() - t_start
            tps = (tokens_before + x_all.size) / max(elapsed, 1e-9)
            _append(self.metrics_path, self.records, {"step": done, "loss": loss, "lr": lr,
                                                      "grad_norm": float(norm.asnumpy()), "tokens": int(x_all.size),
                                                      "tokens_per_s": tps, "elapsed_s": elapsed})
        return loss, int(x_all.size)

    def evaluate(self, step: int, held_set, result: TrainResult) -> None:
        """Held-out loss per labelled token, logged; under TP the forward is collective."""
        import mindspore as ms
        from mindspore import Tensor

        from .train_network import shifted

        cfg = self.cfg
        if (self.rank != 0 and cfg.tp == 1) or not len(held_set[0]):
            return
        total, count = 0.0, 0
        for i in range(0, len(held_set[0]), cfg.micro_batch):
            x, y = shifted(held_set[0][i:i + cfg.micro_batch], held_set[1][i:i + cfg.micro_batch])
            if len(x) < cfg.micro_batch:  # keep one compiled shape: pad with unlabelled rows
                pad = cfg.micro_batch - len(x)
                x = np.concatenate([x, np.repeat(x[-1:], pad, 0)])
                y = np.concatenate([y, np.full((pad, y.shape[1]), -100, np.int32)])
            total += float(self.loss_net(Tensor(x), Tensor(y), Tensor(0.0, ms.float32)).asnumpy())
            count += int((y != -100).sum())
        value = total / max(1, count)
        result.held_out.append((step, value))
        if self.rank == 0:
            _append(self.metrics_path, self.records, {"step": step, "held_out_loss": value})

    def save(self, done: int) -> None:
        tensors, opt_state = self.full_state() if self.gatherer is not None or self.rank == 0 else ({}, {})
        if self.gatherer is not None and done == self.cfg.max_steps:
            self.final = tensors  # the whole weights (no LoRA under TP): no second gather in finish
        if self.rank == 0:
            save_checkpoint(self.out_dir, done, tensors, opt_state,
                            {"config": self.cfg.to_dict(), "base_model": str(Path(self.model_dir).absolute()),
                             "metrics_lines": len(self.records)}, self.cfg.keep_last)

    def finish(self, steps: int) -> Path | None:
        """The loss plot, and OUT/model once the run is complete (rank 0; a TP run gathers first)."""
        from codefill.model.checkpoint import save_model_dir

        from .plot_png import plot_losses

        cfg = self.cfg
        if steps == cfg.max_steps and self.gatherer is not None and self.final is None:  # resumed at the end
            self.final = self.full_state()[0]  # collective: before the rank-0-only part
        if self.rank != 0:
            return None
        plot_losses(self.out_dir / "loss.png", [(r["step"], r["loss"]) for r in self.records if "loss" in r],
                    [(r["step"], r["held_out_loss"]) for r in self.records if "held_out_loss" in r])
        if steps != cfg.max_steps:
            return None
        final = self.final if self.final is not None else {n: p.asnumpy() for n, p in self.weights.items()}
        if cfg.lora is not None:
            adapters = {n: p.asnumpy() for n, p in self.trained.items()}
            final = merge_adapters(self.files.weights, adapters, self.files.config.n_layers, cfg.lora)
        note = f"finetuned from {Path(self.model_dir).absolute()} for {cfg.max_steps} steps"
        return save_model_dir(self.out_dir / MODEL_SUBDIR, self.files.config, final, self.files.tokenizer_path,
                              note=note, overwrite=True)


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
