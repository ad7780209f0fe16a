"""Torch replica of `codefill recipe` training, for a learning-rate / shape sweep on a GPU.

Same rows (exported by prepare.py), same batch order (seeded permutation per epoch), same cosine schedule with
linear warmup, AdamW (decay on everything but RMSNorm gains), global-norm clipping, loss summed over scored
positions / their count, N(0, 0.02) init. After training: held-out loss and greedy generation of every
evaluation prompt (stored as ids; sweep/replay.py scores them with codefill's own evaluation).

    python sweep/train.py NAME [key=value ...]        e.g. lr=2e-3 end_lr=2e-4 data=v3 steps=1300
    python sweep/train.py NAME weights=models/codefill-stdlib/model.safetensors steps=0   (evaluate a model)
    python sweep/train.py NAME weights=... steps=150 lr=2e-4 end_lr=2e-5 eot_weight=10   (continue one)
"""
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).parent
CARRY = HERE / "carry"
OUT = Path(os.environ.get("OUT", HERE / "out"))
DEFAULTS = dict(data="v3", steps=1300, batch=8, lr=1e-3, end_lr=1e-4, warmup=0.05, wd=0.1, beta1=0.9, beta2=0.95,
                eps=1e-8, clip=1.0, seed=0, init_seed=0, std=0.02, eval_every=100, weights="",
                dim=256, layers=6, heads=4, kv_heads=2, ffn=768, gen_batch=96, gen_limit=0, eot_weight=1.0,
                gen_sets="single,held")


def parse(argv):
    cfg = dict(DEFAULTS)
    for a in argv:
        k, v = a.split("=", 1)
        if k not in cfg:
            raise SystemExit(f"unknown key {k!r}; known: {sorted(cfg)}")
        cfg[k] = type(DEFAULTS[k])(v) if not isinstance(DEFAULTS[k], float) else float(v)
    return cfg


def batch_rows(n_rows, step, batch, seed):
    out = []
    for g in range(step * batch, step * batch + batch):
        epoch, i = divmod(g, n_rows)
        out.append(np.random.default_rng([seed, epoch]).permutation(n_rows)[i])
    return np.array(out, np.int64)


def cosine_lr(c, step):
    warm = int(c["warmup"] * c["steps"])
    if step < warm:
        return c["lr"] * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, c["steps"] - warm))
    return c["end_lr"] + 0.5 * (c["lr"] - c["end_lr"]) * (1.0 + math.cos(math.pi * progress))


def load_rows(name, part, dev):
    z = np.load(CARRY / f"{name}.npz")
    ids = torch.from_numpy(z[f"{part}_ids"].astype(np.int64)).to(dev)
    mask = np.unpackbits(z[f"{part}_mask"], axis=1)[:, :ids.shape[1]].astype(bool)
    return ids, torch.from_numpy(mask).to(dev)


def loss_of(model, ids, mask, eot=None, eot_weight=1.0):
    """Mean loss over the scored positions; with eot_weight != 1, positions whose target is <EOT> count
    that many times (the normaliser stays the number of scored positions)."""
    logits = model(input_ids=ids[:, :-1]).logits.float()
    target, m = ids[:, 1:], mask[:, 1:].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    w = m if eot_weight == 1.0 else m * (1.0 + (eot_weight - 1.0) * (target == eot).float())
    return (nll * w.reshape(-1)).sum() / m.sum().clamp(min=1)


@torch.no_grad()
def held_loss(model, ids, mask):
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(ids), 8):
        logits = model(input_ids=ids[i:i + 8, :-1]).logits.float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[i:i + 8, 1:].reshape(-1), reduction="none")
        m = mask[i:i + 8, 1:].reshape(-1)
        total += float((nll * m).sum())
        n += int(m.sum())
    model.train()
    return total / n


@torch.no_grad()
def greedy(model, prompts, max_new, stops, pad, dev, batch):
    """Greedy continuation of each prompt (ids up to and including the first stop), left-padded batches."""
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [None] * len(prompts)
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        att = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            p = prompts[i]
            ids[r, width - len(p):] = torch.tensor(p)
            att[r, width - len(p):] = 1
        pos = (att.cumsum(1) - 1).clamp(min=0)
        ids, att, pos = ids.to(dev), att.to(dev), pos.to(dev)
        gen = [[] for _ in idx]
        done = [False] * len(idx)
        cache = None
        step_ids, step_pos = ids, pos
        for _ in range(max_new):
            o = model(input_ids=step_ids, attention_mask=att, position_ids=step_pos, past_key_values=cache,
                      use_cache=True)
            cache = o.past_key_values
            nxt = o.logits[:, -1].float().argmax(-1)
            for r, t in enumerate(nxt.tolist()):
                if not done[r]:
                    gen[r].append(t)
                    done[r] = t in stops
            if all(done):
                break
            step_ids = nxt[:, None]
            step_pos = step_pos[:, -1:] + 1
            att = torch.cat([att, torch.ones((len(idx), 1), dtype=att.dtype, device=dev)], 1)
        for r, i in enumerate(idx):
            out[i] = gen[r]
    model.train()
    return out


def main():
    name, c = sys.argv[1], parse(sys.argv[2:])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    hf = json.loads((CARRY / "hf.json").read_text())
    conf = dict(hf["config"])
    conf.update(hidden_size=c["dim"], num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                num_key_value_heads=c["kv_heads"], intermediate_size=c["ffn"], head_dim=c["dim"] // c["heads"])
    torch.manual_seed(c["init_seed"])
    model = LlamaForCausalLM(LlamaConfig(**conf)).to(dev)
    if c["weights"]:
        from safetensors.numpy import load_file
        w = load_file(c["weights"])
        sd = {hf["names"][k]: torch.from_numpy(v.astype(np.float32)) for k, v in w.items()}
        missing = model.load_state_dict(sd, strict=False)
        assert not missing.unexpected_keys and all("rotary" in k for k in missing.missing_keys), missing
    else:
        with torch.no_grad():
            g = torch.Generator().manual_seed(c["init_seed"])
            for n, p in model.named_parameters():
                if n.endswith("norm.weight") or "layernorm" in n:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * c["std"])
    n_params = sum(p.numel() for p in model.parameters())
    train_ids, train_mask = load_rows(c["data"], "train", dev)
    held_ids, held_mask = load_rows(c["data"], "heldout", dev)
    decay = [p for n, p in model.named_parameters() if not ("norm" in n)]
    no_decay = [p for n, p in model.named_parameters() if "norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c["wd"]}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=c["lr"], betas=(c["beta1"], c["beta2"]), eps=c["eps"], fused=dev == "cuda")
    eot_id = json.loads((CARRY / "prompts.json").read_text())["eot"]
    curve, t0 = [], time.time()
    model.train()
    for step in range(c["steps"]):
        for gr in opt.param_groups:
            gr["lr"] = cosine_lr(c, step)
        rows = torch.from_numpy(batch_rows(len(train_ids), step, c["batch"], c["seed"])).to(dev)
        loss = loss_of(model, train_ids[rows], train_mask[rows], eot_id, c["eot_weight"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), c["clip"])
        opt.step()
        done = step + 1
        if done % c["eval_every"] == 0 or done == c["steps"] or done == 50:
            curve.append({"step": done, "loss": float(loss), "grad_norm": float(gnorm),
                          "held_out_loss": held_loss(model, held_ids, held_mask), "s": round(time.time() - t0, 1)})
            print(name, curve[-1], flush=True)
    result = {"name": name, "config": c, "params": n_params, "train_s": round(time.time() - t0, 1), "curve": curve,
              "held_out_loss": held_loss(model, held_ids, held_mask)}
    prompts = json.loads((CARRY / "prompts.json").read_text())
    stops = {prompts["eot"], prompts["eos"]}
    t1 = time.time()
    lim = c["gen_limit"] or None
    result["generated"] = {k: greedy(model, prompts[k][:lim], prompts["max_new"][k], stops, prompts["eos"], dev,
                                     c["gen_batch"]) for k in c["gen_sets"].split(",")}
    result["gen_s"] = round(time.time() - t1, 1)
    result["eot"] = {k: sum(1 for g in v if g and g[-1] in stops) for k, v in result["generated"].items()}
    print(name, "held", result["held_out_loss"], "eot", result["eot"], "train_s", result["train_s"],
          "gen_s", result["gen_s"], flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
