"""The PyTorch trainer against the MindSpore one on the CPU at toy size (same rows, same losses), its
checkpoints in parts, resume, the time budget, and its Hugging Face output through `codefill convert`; and
the FIM rows of a corpus (the same whatever the number of processes, and their row files)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from codefill.model.checkpoint import load_model_dir
from codefill.training.corpus_rows import corpus_rows, load_rows, save_rows, spread
from codefill.training.corpus_shards import Doc, write_shards
from codefill.training.fim_examples import FimConfig
from codefill.training.mindrecord_io import write_rows
from codefill.training.train_config import PRESETS
from codefill.training.train_error import TrainError
from helpers import FIXED_CORPUS, make_tiny_model_dir, run_codefill

torch = pytest.importorskip("torch")
from codefill.training.torch_trainer import train_torch  # noqa: E402 (after the skip)

SEQ = 32
FIM = FimConfig(fim_rate=0.9, spm_rate=0.5, seed=0, line_rate=0.5, line_lines=3, window_tokens=24, pack=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A corpus directory as `codefill data corpus` writes it: train and held-out xz shards."""
    out = tmp_path_factory.mktemp("corpus")
    chunks = FIXED_CORPUS.split("\n\n\n")
    write_shards([Doc("pkg", f"m{i}.py", c) for i, c in enumerate(chunks * 3)], out, "train", raw_bytes=2000)
    write_shards([Doc("held", "h.py", chunks[0])], out, "heldout")
    return out


@pytest.fixture(scope="module")
def rows(tiny_dir, corpus):
    tok = tiny_dir / "tokenizer.model"
    return (corpus_rows(corpus, tok, FIM, SEQ + 1, workers=1),
            spread(corpus_rows(corpus, tok, FIM, SEQ + 1, part="heldout", workers=1), 4))


def cfg(**kw):
    return replace(PRESETS["tiny-test"], seq_length=SEQ, eval_rows=4, **kw)


def test_corpus_rows_do_not_depend_on_the_process_count_and_round_trip(tiny_dir, corpus, rows, tmp_path):
    train, _ = rows
    assert len(train) > 8 and train.ids.shape[1] == SEQ + 1 and train.scored[:, 0].all()
    two = corpus_rows(corpus, tiny_dir / "tokenizer.model", FIM, SEQ + 1, workers=2)
    assert np.array_equal(two.ids, train.ids) and np.array_equal(two.scored, train.scored)
    paths = save_rows(train, tmp_path, "train", max_bytes=1000)
    assert len(paths) > 1 and all(p.stat().st_size <= 1000 for p in paths)
    back = load_rows(paths)
    assert np.array_equal(back.ids, train.ids) and np.array_equal(back.scored, train.scored)


def test_torch_trainer_matches_the_mindspore_trainer(tiny_dir, rows, tmp_path):
    """Same rows, same schedule: every step's loss and the held-out losses agree, and so do the weights."""
    from codefill.training.trainer import train

    train_rows, held = rows
    c = cfg(max_steps=8, eval_every=4, weight_decay=0.1)
    as_pairs = lambda r: [(r.ids[i].astype(np.int32), r.labels(i).astype(np.int32)) for i in range(len(r))]
    write_rows(tmp_path / "train.mindrecord", as_pairs(train_rows))
    write_rows(tmp_path / "held.mindrecord", as_pairs(held))
    ms = train(tiny_dir, tmp_path / "train.mindrecord", tmp_path / "ms", c, held_out_data=tmp_path / "held.mindrecord",
               progress=False)
    pt = train_torch(tiny_dir, train_rows, held, tmp_path / "pt", c, device="cpu", progress=False)
    np.testing.assert_allclose(pt.losses, ms.losses, rtol=2e-4)
    assert [s for s, _ in pt.held_out] == [s for s, _ in ms.held_out] == [4, 8]
    np.testing.assert_allclose([v for _, v in pt.held_out], [v for _, v in ms.held_out], rtol=2e-4)
    assert ms.losses[-1] < ms.losses[0] - 0.3   # it did learn: the comparison is not of two flat lines
    ms_w = load_model_dir(ms.model_dir).weights
    run_codefill("convert", "--from-hf", pt.hf_dir, "--output", tmp_path / "pt-model")  # as a user loads it
    pt_w = load_model_dir(tmp_path / "pt-model").weights
    for name, w in ms_w.items():
        np.testing.assert_allclose(pt_w[name], w, atol=2e-4, err_msg=name)
    records = [json.loads(line) for line in (tmp_path / "pt" / "metrics.jsonl").read_text().splitlines()]
    ms_records = [json.loads(line) for line in (tmp_path / "ms" / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r) for r in records] == [sorted(r) for r in ms_records]


def test_resume_continues_from_a_checkpoint_in_parts(tiny_dir, rows, tmp_path):
    train_rows, held = rows
    c = cfg(max_steps=6, eval_every=3, save_every=100)
    first = train_torch(tiny_dir, train_rows, held, tmp_path / "run", c, device="cpu", stop_after=3,
                        part_bytes=100_000, progress=False)
    assert first.steps == 3 and first.hf_dir is None
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000003"
    parts = sorted(ckpt.glob("weights-*.safetensors"))
    # output.weight (131,072 bytes) is cut in pieces; every file stays under the limit
    assert len(parts) > 2 and all(p.stat().st_size <= 100_000 for p in parts) and (ckpt / "COMPLETE").exists()
    from codefill.training.torch_trainer import read_parts

    state = json.loads((ckpt / "state.json").read_text())
    assert read_parts(ckpt, state["parts"])["output.weight"].shape == (512, 64)
    lean = tmp_path / "init"   # a resumed attempt needs the initial MODEL_DIR's config and tokenizer only
    lean.mkdir()
    for name in ("config.json", "tokenizer.model"):
        (lean / name).write_bytes((tiny_dir / name).read_bytes())
    second = train_torch(lean, train_rows, held, tmp_path / "run", c, device="cpu", resume=True, progress=False)
    assert second.steps == 6 and len(second.losses) == 3 and second.hf_dir is not None
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    # a run never interrupted takes the same first three steps
    whole = train_torch(tiny_dir, train_rows, held, tmp_path / "whole", c, device="cpu", progress=False)
    np.testing.assert_allclose(whole.losses[:3], first.losses, rtol=1e-6)
    with pytest.raises(TrainError, match="different config"):
        train_torch(tiny_dir, train_rows, held, tmp_path / "run", replace(c, lr=1.0), device="cpu", resume=True,
                    progress=False)
    with pytest.raises(TrainError, match="exists and is not empty"):
        train_torch(tiny_dir, train_rows, held, tmp_path / "run", c, device="cpu", progress=False)


def test_time_budget_stops_with_a_checkpoint(tiny_dir, rows, tmp_path):
    train_rows, held = rows
    c = cfg(max_steps=50, save_every=0)
    result = train_torch(tiny_dir, train_rows, held, tmp_path / "run", c, device="cpu", time_budget_s=0.0,
                         checkpoint_dtype="bfloat16", progress=False)
    assert result.stopped_early and result.steps == 1 and result.hf_dir is None
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000001" / "state.json").read_text())
    assert state["step"] == 1 and state["weights_dtype"] == "bfloat16"
    again = train_torch(tiny_dir, train_rows, held, tmp_path / "run", c, device="cpu", resume=True,
                        time_budget_s=0.0, progress=False)
    assert again.steps == 2


def test_rows_that_do_not_fit_are_refused(tiny_dir, rows, tmp_path):
    train_rows, held = rows
    with pytest.raises(TrainError, match=r"rows of 33 ids do not fit seq_length 64"):
        train_torch(tiny_dir, train_rows, held, tmp_path / "run", replace(cfg(), seq_length=64), device="cpu",
                    progress=False)
    with pytest.raises(TrainError, match="LoRA"):
        train_torch(tiny_dir, train_rows, held, tmp_path / "run", replace(cfg(), lora=PRESETS["lora"].lora),
                    device="cpu", progress=False)


def test_cpu_speed_options_train_the_same_run_closely(tiny_dir, rows, tmp_path):
    """bf16 autocast and torch.compile on a CPU: the same steps as float32 eager, losses within bf16's rounding,
    saved weights still float32; and a bf16 run resumes a float32 run's checkpoint (how a long run switches)."""
    train_rows, held = rows
    c = cfg(max_steps=6, eval_every=3)
    eager = train_torch(tiny_dir, train_rows, held, tmp_path / "fp32", c, device="cpu", progress=False)
    fast = train_torch(tiny_dir, train_rows, held, tmp_path / "bf16", c, device="cpu", autocast="bf16",
                       torch_compile=True, progress=False)
    np.testing.assert_allclose(fast.losses, eager.losses, rtol=2e-2)
    assert np.max(np.abs(np.subtract(fast.losses, eager.losses))) > 0   # bf16 did run: not bit-identical
    assert fast.losses[-1] < fast.losses[0] - 0.3
    run_codefill("convert", "--from-hf", fast.hf_dir, "--output", tmp_path / "bf16-model")
    assert load_model_dir(tmp_path / "bf16-model", dtype=None).stored_dtype == "float32"
    half = train_torch(tiny_dir, train_rows, held, tmp_path / "switch", c, device="cpu", stop_after=3, progress=False)
    rest = train_torch(tiny_dir, train_rows, held, tmp_path / "switch", c, device="cpu", resume=True,
                       autocast="bf16", progress=False)
    np.testing.assert_allclose(half.losses, eager.losses[:3], rtol=1e-6)
    assert rest.steps == 6 and len(rest.losses) == 3
    with pytest.raises(TrainError, match="autocast must be bf16 or fp32, got 'fp16'"):
        train_torch(tiny_dir, train_rows, held, tmp_path / "bad", c, device="cpu", autocast="fp16", progress=False)
