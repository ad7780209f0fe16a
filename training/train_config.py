"""How a finetune runs, as dataclasses with named presets; the architecture stays in model/config.py.

    TrainConfig   optimisation (AdamW, cosine schedule, clipping, accumulation), batch, intervals, parallelism
    LoraConfig    low-rank adapters: rank, alpha, dropout, which projections; None in TrainConfig = full finetune

The global batch of one optimiser step is micro_batch * grad_accum * dp rows; the loss is the mean over all
labelled tokens of that global batch (not a mean of per-micro-batch means), so splitting the same global
batch differently over accumulation steps or data-parallel ranks gives the same update.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .train_error import TrainError

PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0  # the update is (alpha / rank) * B @ A
    dropout: float = 0.05  # on the adapter's input only; the frozen path sees no dropout
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank < 1:
            raise TrainError(f"lora rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise TrainError(f"lora alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise TrainError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        bad = [t for t in self.targets if t not in PROJECTIONS]
        if bad or not self.targets:
            raise TrainError(f"lora targets {list(self.targets)} must be a non-empty subset of {list(PROJECTIONS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class TrainConfig:
    seq_length: int = 512  # positions trained on; data rows hold seq_length + 1 ids
    micro_batch: int = 1  # rows per forward/backward on one rank
    grad_accum: int = 8  # micro-batches summed per optimiser step
    max_steps: int = 1000  # optimiser steps; the run stops there (epochs repeat the data in a new order)
    lr: float = 2e-5  # peak learning rate
    end_lr: float = 2e-6  # cosine decays to this at max_steps
    warmup_ratio: float = 0.03  # linear warmup over this fraction of max_steps
    weight_decay: float = 0.0  # decoupled (AdamW); not applied to RMSNorm gains
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # global gradient norm; 0 disables clipping
    seed: int = 0
    log_every: int = 1
    eval_every: int = 50  # held-out loss every N steps (and at the end); 0: only at the end
    eval_rows: int = 64  # held-out rows evaluated each time
    save_every: int = 100  # checkpoint every N steps (and at the end)
    keep_last: int = 2  # checkpoints kept; older ones are deleted after a newer one is complete
    dp: int = 1  # data-parallel ranks (msrun)
    tp: int = 1  # tensor-parallel ranks (msrun; tp_train.py): full finetune only, with dp 1
    lora: LoraConfig | None = field(default_factory=LoraConfig)

    def __post_init__(self):
        for name in ("seq_length", "micro_batch", "grad_accum", "max_steps", "dp", "tp", "keep_last", "eval_rows"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise TrainError(f"{name} must be a positive integer, got {v!r}")
        for name in ("log_every", "eval_every", "save_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise TrainError(f"{name} must be a non-negative integer, got {v!r}")
        if not (self.lr > 0 and 0 <= self.end_lr <= self.lr):
            raise TrainError(f"need lr > 0 and 0 <= end_lr <= lr, got lr {self.lr} end_lr {self.end_lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise TrainError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.clip_norm < 0 or self.weight_decay < 0:
            raise TrainError(f"clip_norm {self.clip_norm} and weight_decay {self.weight_decay} must be >= 0")

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup_ratio * self.max_steps)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        lora = d.pop("lora", None)
        try:
            return cls(**d, lora=None if lora is None else LoraConfig(**lora))
        except TypeError as e:
            raise TrainError(f"bad training config {d}: {e}") from e


PRESETS: dict[str, TrainConfig] = {
    # Code Llama on one user's repository: adapters on attention, a few hundred steps.
    "lora": TrainConfig(),
    "full": TrainConfig(lora=None, lr=1e-5, end_lr=1e-6, weight_decay=0.1),
    # What `codefill train --repo` runs on the serving model.
    "refresh": TrainConfig(seq_length=1024, grad_accum=4, max_steps=200, lr=2e-4, end_lr=2e-5, warmup_ratio=0.05,
                           eval_every=50, save_every=50),
    # Tests and demos on the tiny presets: seconds on a CPU.
    "tiny-test": TrainConfig(seq_length=64, micro_batch=2, grad_accum=2, max_steps=20, lr=3e-3, end_lr=3e-4,
                             warmup_ratio=0.1, eval_every=10, eval_rows=8, save_every=10, lora=None),
}


def preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise TrainError(f"unknown training preset {name!r}; known: {', '.join(PRESETS)}") from None


def cosine_lr(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimiser step `step` (0-based): linear warmup to lr, then cosine to end_lr."""
    import math

    warm = cfg.warmup_steps
    if step < warm:
        return cfg.lr * (step + 1) / warm
    span = max(1, cfg.max_steps - warm)
    progress = min(1.0, (step - warm) / span)
    return cfg.end_lr + 0.5 * (cfg.lr - cfg.end_lr) * (1.0 + math.cos(math.pi * progress))


def check_train_tp(cfg: TrainConfig, arch) -> None:
    """Raise TrainError unless `cfg.tp` ranks can train the architecture `arch` with this config: the launchers
    call it before any rank starts. Not supported: --tp with --dp > 1 (it would need separate TP and DP
    communication groups; every collective uses the world group) and --tp with LoRA (a replicated LoRA A on
    a column-parallel projection receives only a partial gradient per rank and needs its own reduction)."""
    from codefill.inference_workers.sharding import TensorParallelError, check_tp

    if cfg.tp == 1:
        return
    if cfg.dp > 1:
        raise TrainError(f"--tp {cfg.tp} with --dp {cfg.dp} is not supported: use tensor parallelism or data "
                         f"parallelism, not both (dp 1 with tp {cfg.tp}, or tp 1 with dp {cfg.dp})")
    if cfg.lora is not None:
        raise TrainError(f"--tp {cfg.tp} trains the full model only; LoRA (rank {cfg.lora.rank}, targets "
                         f"{','.join(cfg.lora.targets)}) with tensor parallelism is not supported: pass --full "
                         f"(or --preset full), or train LoRA with --tp 1")
    try:
        check_tp(arch, cfg.tp)
    except TensorParallelError as e:
        raise TrainError(f"cannot train with --tp {cfg.tp}: {e}") from e
