"""The PyTorch trainer: codefill's training math on a CUDA machine (or a CPU), for runs MindSpore cannot reach.

It trains transformers' `LlamaForCausalLM` (the reference our parity tests hold the one model to) with exactly
the MindSpore trainer's step (trainer.py, train_network.py, optimizer.py), so the two are interchangeable and
tests/test_torch_trainer.py checks it on the CPU (same rows, same losses):
  - rows of step s: batch_order.global_batch_rows(n, s, global batch, seed), micro-batches of micro_batch;
  - loss: cross-entropy summed over labelled positions, gradients of the sum divided by the global batch's
    labelled-token count (not a mean of micro-batch means);
  - clipping at clip_norm by the global L2 norm (factor min(1, clip / (norm + 1e-6)));
  - AdamW with decoupled weight decay on every tensor but the 1-D ones (RMSNorm gains), bias-corrected,
    eps outside the square root; learning rate train_config.cosine_lr (linear warmup, cosine to end_lr);
  - held-out loss: the summed loss over held-out rows / their labelled tokens, every eval_every steps and at
    the end.
On CUDA the forward and backward run under bfloat16 autocast (weights, gradients and optimiser in float32);
on a CPU everything is float32 unless `autocast="bf16"` asks for the same autocast there (CPUs with AVX512-BF16
or AMX run its matrix products faster). `torch_compile=True` runs the training forward and loss through
torch.compile (the held-out loss stays eager). Both are speed options; neither changes what is saved.

What differs from the MindSpore trainer: checkpoints hold the weights only, in parts of at most
`part_bytes` (the GPU machine brings back at most 64 MiB in files of at most 16 MiB, and AdamW state does not
fit), so a resumed run restarts AdamW's moments from zero at its step (bias correction as for a new run) and
its loss curve bumps for a few steps; a run never interrupted is unaffected. A resumed attempt reads only
MODEL_DIR's config.json and tokenizer.model, not its initial weights, so they need not travel again.

    OUT/metrics.jsonl            the MindSpore trainer's records ({"step", "loss", "lr", "grad_norm", "tokens",
                                 "tokens_per_s", "elapsed_s"}, {"step", "held_out_loss"})
    OUT/checkpoints/step-N/      weights-NNNNN.safetensors (codefill names), state.json, COMPLETE last
    OUT/hf/                      at the end: a Hugging Face checkpoint (config.json, safetensors in parts, in
                                 the checkpoints' dtype, tokenizer.model) that `codefill convert --from-hf` loads

`time_budget_s` stops the run cleanly before the budget is spent (the next step and a checkpoint must fit),
saving a checkpoint; run again with resume to continue.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from codefill.model.checkpoint import (TOKENIZER_NAME, atomic_directory, load_model_dir, read_model_config,
                                       write_json_synced)
from codefill.model.safetensors_io import BFLOAT16, from_float32, read_safetensors, to_float32, write_safetensors
from codefill.model.weights import hf_name_map

from .batch_order import global_batch_rows
from .corpus_rows import Rows
from .mindrecord_io import IGNORE_INDEX
from .train_config import TrainConfig, cosine_lr
from .train_error import TrainError

STATE_FORMAT = "codefill-torch-train-state"
PART_BYTES = 15 * (1 << 20)   # under the 16 MiB per file the GPU machine returns
HF_SUBDIR = "hf"


@dataclass
class TorchTrainResult:
    out_dir: Path
    steps: int                       # optimiser steps done in total
    stopped_early: bool = False      # the time budget ran out before max_steps
    losses: list[float] = field(default_factory=list)
    held_out: list[tuple[int, float]] = field(default_factory=list)
    hf_dir: Path | None = None
    tokens_per_s: float = 0.0


def hf_model(arch, weights: dict[str, np.ndarray]) -> LlamaForCausalLM:
    """transformers' Llama with codefill's weights (float32), mapped by the one name map."""
    model = LlamaForCausalLM(HFLlamaConfig(**arch.to_hf(torch_dtype="float32")))
    names = hf_name_map(arch)
    state = {names[k]: torch.from_numpy(np.ascontiguousarray(to_float32(v), np.float32)) for k, v in weights.items()}
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or any("rotary" not in k for k in result.missing_keys):
        raise TrainError(f"weights do not fit the architecture: missing {result.missing_keys[:4]}, unexpected "
                         f"{result.unexpected_keys[:4]}")
    return model


def codefill_weights(model: LlamaForCausalLM, arch) -> dict[str, np.ndarray]:
    """The model's weights under codefill's names, float32 numpy."""
    state = model.state_dict()
    return {ours: state[theirs].detach().float().cpu().numpy() for ours, theirs in hf_name_map(arch).items()}


def summed_loss(model, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> torch.Tensor:
    """Cross-entropy summed over positions whose label is not IGNORE_INDEX (train_network.LanguageModelLoss)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=x).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def _shifted(rows: Rows, index, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [B, L+1] -> (inputs [B, L], targets [B, L]) on `device` (train_network.shifted)."""
    ids = torch.from_numpy(rows.ids[index].astype(np.int64))
    labels = torch.from_numpy(rows.labels(index))
    return ids[:, :-1].to(device), labels[:, 1:].to(device)


class _TorchRun:
    def __init__(self, model_dir: Path, out_dir: Path, cfg: TrainConfig, device: torch.device,
                 part_bytes: int, checkpoint_dtype: str, bf16: bool, torch_compile: bool):
        # MODEL_DIR's weights are read only when no checkpoint is resumed (restore): a resumed attempt needs
        # its config.json and tokenizer.model only, so the initial weights need not travel again
        self.arch = read_model_config(model_dir)[0]
        self.tokenizer_path, self.model_dir = Path(model_dir) / TOKENIZER_NAME, model_dir
        self.out_dir, self.cfg, self.device = out_dir, cfg, device
        self.part_bytes, self.checkpoint_dtype = part_bytes, checkpoint_dtype
        self.bf16, self.torch_compile = bf16, torch_compile
        self.metrics_path = out_dir / "metrics.jsonl"
        self.records: list[dict] = []
        self.model: LlamaForCausalLM | None = None
        self.opt: torch.optim.Optimizer | None = None

    def _start(self, weights: dict[str, np.ndarray]) -> None:
        self.model = hf_model(self.arch, weights).to(self.device)
        self.model.train()
        self.opt = self._optimizer()   # on resume the moments restart: see the module docstring
        self.train_loss = partial(summed_loss, self.model, bf16=self.bf16)
        if self.torch_compile:
            self.train_loss = torch.compile(self.train_loss)

    def _optimizer(self) -> torch.optim.Optimizer:
        params = list(self.model.parameters())
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        return torch.optim.AdamW([{"params": decay, "weight_decay": self.cfg.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=self.cfg.lr,
                                 betas=(self.cfg.beta1, self.cfg.beta2), eps=self.cfg.eps,
                                 fused=self.device.type == "cuda")

    # --- checkpoints ----------------------------------------------------------------------------------------

    def restore(self, resume: bool) -> int:
        ckpt = latest_checkpoint(self.out_dir) if resume else None
        if ckpt is None:
            if not resume and self.out_dir.exists() and any(self.out_dir.iterdir()):
                raise TrainError(f"output {self.out_dir} exists and is not empty; resume to continue the run in it")
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.metrics_path.exists():
                self.metrics_path.unlink()
            # no SentencePiece needed on the GPU machine: the vocabulary was checked where init was written
            self._start(load_model_dir(self.model_dir, vocab_check=False).weights)
            return 0
        state = json.loads((ckpt / "state.json").read_text())
        saved = TrainConfig.from_dict(state["config"])
        if replace(saved, max_steps=self.cfg.max_steps) != self.cfg:
            raise TrainError(f"checkpoint {ckpt} was made with a different config: {saved} vs {self.cfg}")
        self._start(read_parts(ckpt, state["parts"]))
        lines = self.metrics_path.read_text().splitlines()[:state["metrics_lines"]] if self.metrics_path.exists() else []
        self.records = [json.loads(line) for line in lines]
        _rewrite(self.metrics_path, self.records)
        return int(state["step"])

    def save(self, step: int) -> Path:
        weights = codefill_weights(self.model, self.arch)
        if self.checkpoint_dtype == "bfloat16":
            weights = {k: from_float32(v, BFLOAT16) for k, v in weights.items()}
        path = self.out_dir / "checkpoints" / f"step-{step:08d}"
        with atomic_directory(path, overwrite=True) as tmp:
            parts = _write_parts(tmp, weights, self.part_bytes)
            write_json_synced(tmp / "state.json", {"format": STATE_FORMAT, "version": 1, "step": step,
                                                   "config": self.cfg.to_dict(), "parts": parts,
                                                   "base_model": str(Path(self.model_dir).absolute()),
                                                   "metrics_lines": len(self.records),
                                                   "weights_dtype": self.checkpoint_dtype})
            with open(tmp / "COMPLETE", "w") as f:
                f.write(f"{step}\n")
                f.flush()
                os.fsync(f.fileno())
        for old in complete_checkpoints(self.out_dir)[:-self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    # --- steps ----------------------------------------------------------------------------------------------

    def step(self, step: int, train: Rows, tokens_before: int, t_start: float) -> tuple[float, int]:
        cfg = self.cfg
        rows = global_batch_rows(len(train), step, cfg.global_batch, cfg.seed)
        n_tokens = max(1, int(train.scored[rows][:, 1:].sum()))
        lr = cosine_lr(cfg, step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for m in range(0, len(rows), cfg.micro_batch):
            x, y = _shifted(train, rows[m:m + cfg.micro_batch], self.device)
            loss = self.train_loss(x, y)
            (loss / n_tokens).backward()
            loss_sum += float(loss.detach())
        params = [p for p in self.model.parameters() if p.grad is not None]
        if cfg.clip_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        done = step + 1
        positions = len(rows) * (train.ids.shape[1] - 1)
        if cfg.log_every and (done % cfg.log_every == 0 or done == cfg.max_steps):
            elapsed = time.perf_counter() - t_start
            self._append({"step": done, "loss": loss_sum / n_tokens, "lr": lr, "grad_norm": float(norm),
                          "tokens": positions, "tokens_per_s": (tokens_before + positions) / max(elapsed, 1e-9),
                          "elapsed_s": elapsed})
        return loss_sum / n_tokens, positions

    @torch.no_grad()
    def evaluate(self, step: int, held: Rows) -> float:
        self.model.eval()
        total, count = 0.0, 0
        for i in range(0, len(held), self.cfg.micro_batch):
            index = np.arange(i, min(len(held), i + self.cfg.micro_batch))
            x, y = _shifted(held, index, self.device)
            total += float(summed_loss(self.model, x, y, self.bf16))
            count += int((y != IGNORE_INDEX).sum())
        self.model.train()
        value = total / max(1, count)
        self._append({"step": step, "held_out_loss": value})
        return value

    def write_hf(self) -> Path:
        """OUT/hf: config.json, the weights (in the checkpoints' dtype) in safetensors parts under part_bytes,
        tokenizer.model."""
        out = self.out_dir / HF_SUBDIR
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        dtype = torch.bfloat16 if self.checkpoint_dtype == "bfloat16" else torch.float32
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.model.state_dict().items()}
        self.model.save_pretrained(tmp, state_dict=state, safe_serialization=True, max_shard_size=self.part_bytes)
        shutil.copyfile(self.tokenizer_path, tmp / "tokenizer.model")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        return out

    def _append(self, record: dict) -> None:
        self.records.append(record)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")


def train_torch(model_dir: str | Path, train: Rows, held: Rows, out_dir: str | Path, cfg: TrainConfig, *,
                resume: bool = False, device: str | None = None, time_budget_s: float | None = None,
                stop_after: int | None = None, part_bytes: int = PART_BYTES, checkpoint_dtype: str = "float32",
                autocast: str | None = None, torch_compile: bool = False, progress: bool = True) -> TorchTrainResult:
    """Train (or resume) from MODEL_DIR's weights on `train` rows; see the module docstring. `stop_after`:
    return after that many steps in total, as if interrupted (tests of resume). autocast: "bf16" or "fp32"
    (None: bf16 on CUDA, fp32 on a CPU)."""
    if cfg.lora is not None:
        raise TrainError("the PyTorch trainer trains the full model; LoRA runs on the MindSpore trainer")
    if checkpoint_dtype not in ("float32", "bfloat16"):
        raise TrainError(f"checkpoint_dtype must be float32 or bfloat16, got {checkpoint_dtype!r}")
    if train.ids.shape[1] != cfg.seq_length + 1:
        raise TrainError(f"rows of {train.ids.shape[1]} ids do not fit seq_length {cfg.seq_length} (+1)")
    t_begin = time.monotonic()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if autocast not in (None, "bf16", "fp32"):
        raise TrainError(f"autocast must be bf16 or fp32, got {autocast!r}")
    bf16 = dev.type == "cuda" if autocast is None else autocast == "bf16"
    run = _TorchRun(Path(model_dir), Path(out_dir), cfg, dev, part_bytes, checkpoint_dtype, bf16, torch_compile)
    print(f"[torch-train] on {dev.type}, {'bf16 autocast' if bf16 else 'float32'}"
          f"{', torch.compile' if torch_compile else ''}", flush=True)   # a log line, with or without progress
    start = run.restore(resume)
    end = cfg.max_steps if stop_after is None else min(cfg.max_steps, stop_after)
    result = TorchTrainResult(run.out_dir, start)
    t_start, tokens, slowest = time.perf_counter(), 0, 0.0
    save_s = 0.0
    for step in range(start, end):
        t0 = time.perf_counter()
        loss, n = run.step(step, train, tokens, t_start)
        tokens += n
        result.losses.append(loss)
        done = result.steps = step + 1
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.max_steps:
            result.held_out.append((done, run.evaluate(done, held)))
        slowest = max(slowest, time.perf_counter() - t0)
        if (cfg.save_every and done % cfg.save_every == 0) or done == end:
            t1 = time.perf_counter()
            run.save(done)
            save_s = max(save_s, time.perf_counter() - t1)
        if progress and (done % max(1, cfg.log_every * 10) == 0 or done == end):
            print(f"[torch-train] step {done}/{cfg.max_steps} loss {loss:.4f} "
                  f"{tokens / max(time.perf_counter() - t_start, 1e-9):,.0f} tok/s", flush=True)
        # stop while the next step, an evaluation and a checkpoint still fit the budget
        if time_budget_s is not None and done < end:
            spent = time.monotonic() - t_begin
            if spent + 2 * slowest + 2 * save_s + 5.0 > time_budget_s:
                if not (cfg.save_every and done % cfg.save_every == 0):
                    run.save(done)
                result.stopped_early = True
                break
    result.tokens_per_s = tokens / max(time.perf_counter() - t_start, 1e-9)
    if result.steps == cfg.max_steps:
        if not result.held_out or result.held_out[-1][0] != cfg.max_steps:
            result.held_out.append((cfg.max_steps, run.evaluate(cfg.max_steps, held)))
        result.hf_dir = run.write_hf()
    return result


def complete_checkpoints(out_dir: Path) -> list[Path]:
    root = Path(out_dir) / "checkpoints"
    return sorted(p for p in root.glob("step-*") if (p / "COMPLETE").is_file()) if root.is_dir() else []


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = complete_checkpoints(out_dir)
    return found[-1] if found else None


def checkpoint_model_dir(checkpoint: str | Path, base_model_dir: str | Path, dest: str | Path, *,
                         note: str | None = None) -> Path:
    """A MODEL_DIR at dest (replaced) holding a checkpoint's weights, upcast to float32, with the architecture and
    tokenizer of the run's base MODEL_DIR: to evaluate or serve a run that is still training."""
    from codefill.model.checkpoint import save_model_dir, tokenizer_name

    checkpoint, base_model_dir = Path(checkpoint), Path(base_model_dir)
    if not (checkpoint / "COMPLETE").is_file():
        raise TrainError(f"{checkpoint} is not a complete checkpoint (no COMPLETE marker)")
    state = json.loads((checkpoint / "state.json").read_text())
    if state.get("format") != STATE_FORMAT:
        raise TrainError(f"{checkpoint}/state.json has format {state.get('format')!r}, not {STATE_FORMAT!r}")
    config = read_model_config(base_model_dir)[0]
    weights = {k: to_float32(v) for k, v in read_parts(checkpoint, state["parts"]).items()}
    return save_model_dir(dest, config, weights, base_model_dir / tokenizer_name(config), overwrite=True,
                          note=note or f"step {state['step']} of the run in progress at {checkpoint.parent.parent}")


def _write_parts(directory: Path, weights: dict[str, np.ndarray], part_bytes: int) -> list[str]:
    """weights-NNNNN.safetensors files, each under part_bytes, in name order. A tensor too big for one part is
    cut along its first axis into pieces named NAME#K (read_parts joins them)."""
    room = part_bytes - 64 * 1024   # the header: names, dtypes, shapes and offsets
    pieces: list[tuple[str, np.ndarray]] = []
    for name in sorted(weights):
        w = weights[name]
        if w.nbytes <= room:
            pieces.append((name, w))
            continue
        rows = max(1, room // max(1, w[:1].nbytes))
        if w[:1].nbytes > room:
            raise TrainError(f"one row of tensor {name} is {w[:1].nbytes} bytes, over the part limit {part_bytes}")
        pieces += [(f"{name}#{k}", w[i:i + rows]) for k, i in enumerate(range(0, len(w), rows))]
    parts, current, size = [], {}, 0
    for name, w in pieces:
        if current and size + w.nbytes > room:
            parts.append(current)
            current, size = {}, 0
        current[name] = np.ascontiguousarray(w)
        size += w.nbytes
    if current:
        parts.append(current)
    names = []
    for i, part in enumerate(parts):
        names.append(f"weights-{i:05d}.safetensors")
        write_safetensors(directory / names[-1], part, {"format": STATE_FORMAT})
    return names


def read_parts(directory: Path, parts: list[str]) -> dict[str, np.ndarray]:
    """The weights _write_parts wrote, pieces joined."""
    flat: dict[str, np.ndarray] = {}
    for part in parts:
        flat.update(read_safetensors(directory / part))
    weights = {n: w for n, w in flat.items() if "#" not in n}
    pieces: dict[str, list[tuple[int, np.ndarray]]] = {}
    for n, w in flat.items():
        if "#" in n:
            base, k = n.rsplit("#", 1)
            pieces.setdefault(base, []).append((int(k), w))
    for base, ws in pieces.items():
        weights[base] = np.concatenate([w for _, w in sorted(ws, key=lambda kw: kw[0])])
    return weights


def _rewrite(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)

