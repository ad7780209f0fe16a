"""MODEL_DIR files and Hugging Face conversion, against checkpoints written by transformers itself.

Round trips must be bit-identical in every dtype; any inconsistent checkpoint must be refused with a
CheckpointError naming the problem, leaving no output directory (and no temporary sibling) behind.
"""

from __future__ import annotations

import copy
import json
import shutil
import struct

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from helpers import make_tiny_model_dir, train_test_tokenizer

from codefill.model import convert
from codefill.model.checkpoint import CheckpointError, load_model_dir, save_model_dir
from codefill.model.config import LlamaConfig
from codefill.model.safetensors_io import BFLOAT16, SafetensorsError, from_float32, read_safetensors, \
    to_float32, write_safetensors
from codefill.model.tiny import TINY_NOTE, build_tiny_model_dir, random_weights
from codefill.model.tokenizer import Tokenizer
from codefill.model.weights import hf_name_map

transformers = pytest.importorskip("transformers")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return train_test_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture(scope="module")
def hf_model(tok_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=Tokenizer(tok_path).vocab_size,
                                   rope_theta=1e6, max_position_embeddings=256, rms_norm_eps=1e-5)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to exactly 1; make them distinct so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _save_hf(model, tok_path, out, dtype="float32", layout="single"):
    model = copy.deepcopy(model).to(DTYPES[dtype])  # .to() is in place; the fixture must stay float32
    if layout == "bin":
        out.mkdir()
        model.config.save_pretrained(out)
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    else:
        model.save_pretrained(out, max_shard_size="20KB" if layout == "sharded" else "10GB")
    shutil.copy(tok_path, out / "tokenizer.model")
    return out


def _bits(a) -> bytes:
    if isinstance(a, torch.Tensor):
        return a.contiguous().view(torch.uint8).numpy().tobytes()
    return np.ascontiguousarray(a).tobytes()


def _no_leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


CASES = [("float32", "single"), ("float16", "single"), ("bfloat16", "single"), ("float32", "sharded"),
         ("bfloat16", "sharded"), ("float32", "bin"), ("bfloat16", "bin")]


@pytest.mark.parametrize("dtype, layout", CASES, ids=[f"{d}-{l}" for d, l in CASES])
def test_hf_round_trip_is_bit_identical(hf_model, tok_path, tmp_path, dtype, layout):
    hf_dir = _save_hf(hf_model, tok_path, tmp_path / "hf", dtype, layout)
    if layout == "sharded":
        assert len(list(hf_dir.glob("model-*.safetensors"))) > 1
    state = {k: v.to(DTYPES[dtype]) for k, v in hf_model.state_dict().items()}

    convert.hf_to_model_dir(hf_dir, tmp_path / "ours")
    raw = load_model_dir(tmp_path / "ours", dtype=None)
    assert raw.stored_dtype == dtype
    # transformers 5 writes rope_theta inside rope_parameters; it must not fall back to Llama's 1e4.
    assert (raw.config.rope_theta, raw.config.n_kv_heads, raw.config.norm_eps) == (1e6, 2, 1e-5)
    names = hf_name_map(raw.config)
    for ours, theirs in names.items():
        assert _bits(raw.weights[ours]) == _bits(state[theirs]), ours
    f32 = load_model_dir(tmp_path / "ours")
    for ours, theirs in names.items():
        assert f32.weights[ours].dtype == np.float32
        np.testing.assert_array_equal(f32.weights[ours], state[theirs].float().numpy(), err_msg=ours)

    convert.model_dir_to_hf(tmp_path / "ours", tmp_path / "hf2")
    convert.hf_to_model_dir(tmp_path / "hf2", tmp_path / "ours2")
    again = load_model_dir(tmp_path / "ours2", dtype=None)
    assert again.config == raw.config and again.stored_dtype == dtype
    for name in names:
        assert again.weights[name].dtype == raw.weights[name].dtype
        assert _bits(again.weights[name]) == _bits(raw.weights[name]), name


def test_exported_hf_checkpoint_loads_in_transformers(hf_model, tok_path, tmp_path):
    convert.hf_to_model_dir(_save_hf(hf_model, tok_path, tmp_path / "hf"), tmp_path / "ours")
    convert.model_dir_to_hf(tmp_path / "ours", tmp_path / "hf2")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf2")
    assert back.config.rope_parameters["rope_theta"] == 1e6
    ref = hf_model.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref[k]), k
    ids = torch.tensor([[1, 5, 9, 300]])
    assert torch.equal(back(ids).logits, hf_model(ids).logits)


def _tamper_state(hf_model, tok_path, out, edit):
    state = {k: v.clone().contiguous() for k, v in hf_model.state_dict().items()}
    edit(state)
    _save_hf(hf_model, tok_path, out)
    safetensors.torch.save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


TAMPERS = {
    "missing-tensor": (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), "model.layers.1.mlp.up_proj.weight"),
    "extra-tensor": (lambda s: s.update({"model.layers.0.mlp.bias": torch.zeros(3)}), "model.layers.0.mlp.bias"),
    "wrong-shape": (lambda s: s.update({"model.norm.weight": torch.ones(31)}), r"norm.weight.*\(31,\).*\(32,\)"),
    "mixed-dtype": (lambda s: s.update({"model.norm.weight": s["model.norm.weight"].half()}), "mix dtypes"),
    "int-dtype": (lambda s: s.update({"model.norm.weight": torch.ones(32, dtype=torch.int32)}), "I32"),
}


@pytest.mark.parametrize("kind", TAMPERS)
def test_tampered_tensors_refused(hf_model, tok_path, tmp_path, kind):
    edit, message = TAMPERS[kind]
    hf_dir = _tamper_state(hf_model, tok_path, tmp_path / "hf", edit)
    with pytest.raises(CheckpointError, match=message):
        convert.hf_to_model_dir(hf_dir, tmp_path / "out")
    assert _no_leftovers(tmp_path, "out") == []


def _truncate(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])


def _bad_header_json(d):
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:9] = b"["
    f.write_bytes(bytes(data))


def _huge_header_length(d):
    f = d / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 1 << 40) + f.read_bytes()[8:])


def _overlapping_offsets(d):
    f = d / "model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__" and header[k]["data_offsets"][0] > 0)
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin - 4, end - 4]  # same size, shifted onto its neighbour
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= n
    raw += b" " * (n - len(raw))
    f.write_bytes(data[:8] + raw + data[8 + n:])


def _config_mismatch(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (d / "config.json").write_text(json.dumps(cfg))


def _vocab_mismatch(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] += 16
    (d / "config.json").write_text(json.dumps(cfg))


def _unsupported_rope(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e6}
    (d / "config.json").write_text(json.dumps(cfg))


def _shard_missing_from_index(d):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"].pop("model.norm.weight")
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


FILE_TAMPERS = {
    "truncated": ("single", _truncate, "truncated"),
    "bad-header-json": ("single", _bad_header_json, "header is not JSON"),
    "huge-header-length": ("single", _huge_header_length, "header length"),
    "overlapping-offsets": ("single", _overlapping_offsets, "overlapping or gapped"),
    "config-mismatch": ("single", _config_mismatch, r"mlp.gate_proj.weight|\(48, 32\)"),
    "vocab-mismatch": ("single", _vocab_mismatch, "616"),
    "unsupported-rope": ("single", _unsupported_rope, "rope_parameters"),
    "no-tokenizer": ("single", lambda d: (d / "tokenizer.model").unlink(), "no tokenizer.model"),
    "no-weights": ("single", lambda d: (d / "model.safetensors").unlink(), "has no model.safetensors"),
    "index-incomplete": ("sharded", _shard_missing_from_index, "model.norm.weight"),
}


@pytest.mark.parametrize("kind", FILE_TAMPERS)
def test_tampered_files_refused(hf_model, tok_path, tmp_path, kind):
    layout, edit, message = FILE_TAMPERS[kind]
    hf_dir = _save_hf(hf_model, tok_path, tmp_path / "hf", layout=layout)
    edit(hf_dir)
    with pytest.raises(CheckpointError, match=message):
        convert.hf_to_model_dir(hf_dir, tmp_path / "out")
    assert _no_leftovers(tmp_path, "out") == []


def test_bin_refused_with_old_torch(hf_model, tok_path, tmp_path, monkeypatch):
    hf_dir = _save_hf(hf_model, tok_path, tmp_path / "hf", layout="bin")
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(CheckpointError, match=r"torch 2\.5\.1.*arbitrary code"):
        convert.hf_to_model_dir(hf_dir, tmp_path / "out")
    assert _no_leftovers(tmp_path, "out") == []


def test_bin_with_pickled_code_refused(hf_model, tok_path, tmp_path):
    hf_dir = _save_hf(hf_model, tok_path, tmp_path / "hf", layout="bin")
    torch.save({"model.norm.weight": torch.ones(32), "payload": shutil.rmtree}, hf_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        convert.hf_to_model_dir(hf_dir, tmp_path / "out")


# --- MODEL_DIR -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory)


def test_tiny_model_dir(tiny_dir, tmp_path):
    files = load_model_dir(tiny_dir)
    meta = json.loads((tiny_dir / "config.json").read_text())
    assert meta["format"] == "codefill-model" and meta["version"] == 1 and meta["dtype"] == "float32"
    assert TINY_NOTE in files.note
    assert files.config.vocab_size == Tokenizer(files.tokenizer_path).vocab_size == 512
    assert files.weights["norm.weight"].tolist() == [1.0] * files.config.dim
    assert 0.015 < files.weights["output.weight"].std() < 0.025
    # Deterministic: the same seed builds the same bytes.
    again = build_tiny_model_dir(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.model", "config.json"):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name


def test_save_refuses_nonempty_dir_unless_overwrite(tiny_dir, tmp_path):
    files = load_model_dir(tiny_dir)
    out = tmp_path / "m"
    out.mkdir()
    save_model_dir(out, files.config, files.weights, files.tokenizer_path)  # an empty directory is fine
    with pytest.raises(CheckpointError, match="not empty"):
        save_model_dir(out, files.config, files.weights, files.tokenizer_path)
    half = {k: from_float32(v, np.float16) for k, v in files.weights.items()}
    save_model_dir(out, files.config, half, files.tokenizer_path, overwrite=True)
    assert load_model_dir(out, dtype=None).stored_dtype == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_save_refuses_bad_weights_and_leaves_nothing(tiny_dir, tmp_path):
    files = load_model_dir(tiny_dir)
    weights = dict(files.weights)
    weights["layers.0.attention.wq.weight"] = weights["layers.0.attention.wq.weight"][:, :10]
    with pytest.raises(CheckpointError, match=r"layers\.0\.attention\.wq\.weight.*\(64, 10\)"):
        save_model_dir(tmp_path / "m", files.config, weights, files.tokenizer_path)
    bigger = LlamaConfig.from_dict({**files.config.to_dict(), "vocab_size": 600})
    with pytest.raises(CheckpointError, match="512 pieces.*600"):
        save_model_dir(tmp_path / "m", bigger, random_weights(bigger), files.tokenizer_path)
    assert list(tmp_path.iterdir()) == []


def _copy(tiny_dir, tmp_path):
    return shutil.copytree(tiny_dir, tmp_path / "m")


def test_load_refuses_inconsistent_model_dirs(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    meta = json.loads((d / "config.json").read_text())

    def write(**changes):
        (d / "config.json").write_text(json.dumps({**meta, **changes}))

    for changes, message in [({"format": "llama"}, "format is 'llama'"), ({"version": 2}, "version 2"),
                             ({"dtype": "bfloat16"}, "declares dtype 'bfloat16'.*'float32'"),
                             ({"extra": 1}, r"unknown keys \['extra'\]"),
                             ({"architecture": {**meta["architecture"], "n_layers": 3}}, "layers.2"),
                             ({"architecture": {**meta["architecture"], "vocab_size": 500}}, "512 pieces.*500")]:
        write(**changes)
        with pytest.raises(CheckpointError, match=message):
            load_model_dir(d)
    write()
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        load_model_dir(d)


# --- safetensors_io against the reference library ------------------------------------------------------


def test_safetensors_io_matches_reference_library(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.normal(size=(3, 5)).astype(np.float32), "b": rng.normal(size=(7,)).astype(np.float16),
              "empty": np.zeros((0, 4), np.float32)}
    write_safetensors(tmp_path / "ours.safetensors", arrays, {"k": "v"})
    theirs = safetensors.numpy.load_file(tmp_path / "ours.safetensors")
    for k, v in arrays.items():
        assert theirs[k].dtype == v.dtype and np.array_equal(theirs[k], v)
    safetensors.numpy.save_file(arrays, tmp_path / "theirs.safetensors")
    ours = read_safetensors(tmp_path / "theirs.safetensors")
    for k, v in arrays.items():
        assert ours[k].dtype == v.dtype and np.array_equal(ours[k], v)
    assert not ours["a"].flags.writeable  # memory-mapped, read-only


def test_bfloat16_matches_torch(tmp_path):
    x = torch.cat([torch.randn(1000) * 10, torch.tensor([0.0, -0.0, 1e-40, 3.4e38, float("inf"), -float("inf")])])
    ref = x.to(torch.bfloat16)
    ours = from_float32(x.numpy(), BFLOAT16)
    assert ours.dtype == BFLOAT16 and _bits(ours) == _bits(ref)  # round to nearest even, like torch
    np.testing.assert_array_equal(to_float32(ours), ref.float().numpy())
    assert np.isnan(to_float32(from_float32(np.array([np.nan], np.float32), BFLOAT16)))
    safetensors.torch.save_file({"w": ref}, tmp_path / "bf.safetensors")
    read = read_safetensors(tmp_path / "bf.safetensors")["w"]
    assert read.dtype == BFLOAT16 and _bits(read) == _bits(ref)
    write_safetensors(tmp_path / "ours.safetensors", {"w": read})
    assert torch.equal(safetensors.torch.load_file(tmp_path / "ours.safetensors")["w"], ref)


def test_safetensors_errors_name_file_and_tensor(tmp_path):
    with pytest.raises(SafetensorsError, match="'w'.*int64"):
        write_safetensors(tmp_path / "x.safetensors", {"w": np.zeros(3, np.int64)})
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x00")
    with pytest.raises(SafetensorsError, match="short.safetensors"):
        read_safetensors(tmp_path / "short.safetensors")


def test_rotary_inv_freq_buffers_are_skipped(hf_model, tok_path, tmp_path):
    # Checkpoints from older transformers carry each layer's rotary inverse frequencies; they are derived.
    inv_freq = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(4) for i in range(2)}
    hf_dir = _tamper_state(hf_model, tok_path, tmp_path / "hf", lambda s: s.update(inv_freq))
    files = load_model_dir(convert.hf_to_model_dir(hf_dir, tmp_path / "out"))
    assert len(files.weights) == len(hf_model.state_dict())


def test_export_refuses_nonempty_target(tiny_dir, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        convert.model_dir_to_hf(tiny_dir, tmp_path / "hf")
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"
