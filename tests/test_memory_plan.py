"""The memory plan (inference_workers/memory_plan.py): its arithmetic against hand-computed numbers for the
Code Llama presets, the sizes it chooses, its refusals, and a worker and a TP launch refusing before any
weight is read or any rank started."""

import shutil

import pytest

import codefill.cli
from codefill.inference_workers import memory_plan as mp
from codefill.inference_workers.memory_plan import GIB, Available, MemoryConfig, MemoryPlanError
from codefill.model.config import preset
from helpers import make_tiny_model_dir

BF16 = 2


def hand_weight_elements(name: str, tp: int) -> int:
    """Written out from the architecture: embeddings and norms replicated; attention, FFN and the output head
    cut by tp (column- or row-parallel, vocab-parallel head)."""
    c = preset(name)
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    replicated = c.vocab_size * c.dim + (2 * c.n_layers + 1) * c.dim
    cut = c.n_layers * (c.dim * q + 2 * c.dim * kv + q * c.dim + 3 * c.dim * c.ffn_dim) + c.vocab_size * c.dim
    return replicated + cut // tp


@pytest.mark.parametrize("name", ["codellama-7b", "codellama-13b", "codellama-34b"])
@pytest.mark.parametrize("tp", [1, 4, 8])
def test_weights_of_a_rank_shard(name, tp):
    assert mp.weight_bytes(preset(name), tp, BF16) == BF16 * hand_weight_elements(name, tp)


def test_weights_by_hand():
    assert mp.weight_bytes(preset("codellama-7b"), 1, BF16) == 2 * 6_738_546_688  # the 7B's parameter count
    assert mp.weight_bytes(preset("codellama-7b"), 4, BF16) == 3_566_379_008
    assert mp.weight_bytes(preset("codellama-34b"), 8, BF16) == 8_896_135_168  # 8.29 GiB
    assert mp.weight_bytes(preset("codellama-34b"), 1, 4) == 4 * 33_743_970_304  # fp32


@pytest.mark.parametrize("name,tp,expected", [
    # max_batch 4 x (2048 + 1) x layers x kv_heads/tp x head_dim 128 x 2 x 2 bytes
    ("codellama-7b", 1, 4 * 2049 * 32 * 32 * 128 * 2 * 2),
    ("codellama-13b", 4, 4 * 2049 * 40 * 10 * 128 * 2 * 2),
    ("codellama-34b", 8, 201_424_896),  # 8 KV heads: one per rank
])
def test_kv_cache_of_a_rank(name, tp, expected):
    assert mp.cache_bytes(preset(name), tp, BF16, 4, 2048) == expected


def test_working_space_by_hand():
    # 7B, tp 1, bf16, 4 slots of 2048, on an accelerator: 2 GiB fixed
    # + chunk 512 x (4 x 4096 + 96 heads x 128 + 3 x 11008) x 2 bytes   (activations)
    # + 4 x 2 x 32 heads x 512 x 2049                                     (fp32 scores and probabilities)
    # + 4 x 2 x 4 x (32016 + 32 x 2049)                                   (a decode step's logits and scores)
    expected = 2 * GIB + 512 * 61_696 * 2 + 8 * 32 * 512 * 2049 + 32 * 97_584
    assert expected == 2_482_349_568
    assert mp.work_bytes(preset("codellama-7b"), 1, BF16, 4, 2048, "ascend") == expected
    assert mp.work_bytes(preset("codellama-7b"), 1, BF16, 4, 2048, "cpu") == expected - 2 * GIB + GIB // 2


def _plan(name, tp, gib, **kw):
    kw.setdefault("default_max_seq_len", 2048)
    kw.setdefault("default_max_batch", 4)
    return mp.plan(preset(name), tp, "ascend", Available(int(gib * GIB), f"{gib} GiB given"), **kw)


def test_34b_bf16_on_one_64gib_card_refuses_naming_the_numbers():
    with pytest.raises(MemoryPlanError) as e:
        _plan("codellama-34b", 1, 64)
    msg = str(e.value)
    assert "weights 62.85 GiB + KV cache 1.50 GiB (max_batch 4 x max_seq_len 2048) + working space 2.61 GiB" in msg
    assert "= 66.96 GiB > available 57.60 GiB (90% of 64 GiB given)" in msg
    assert "use a larger --tp than 1" in msg and "bfloat16" in msg


@pytest.mark.parametrize("name", ["codellama-7b", "codellama-13b", "codellama-34b"])
def test_every_preset_fits_at_tp8_with_the_default_cache(name):
    p = _plan(name, 8, 64)
    assert (p.max_seq_len, p.max_batch) == (2048, 4)
    assert p.total <= p.usable == int(0.9 * 64 * GIB)
    assert (p.weights, p.cache) == (mp.weight_bytes(preset(name), 8, BF16),
                                    mp.cache_bytes(preset(name), 8, BF16, 4, 2048))


def _total(name, tp, batch, seq):
    return sum(mp.sizes(preset(name), tp, BF16, batch, seq, "ascend"))


def test_fewer_slots_are_chosen_first_when_the_default_does_not_fit():
    exact = _total("codellama-7b", 1, 2, 2048) / GIB
    assert (_plan("codellama-7b", 1, exact, fraction=1.0).max_batch, _plan("codellama-7b", 1, exact, fraction=1.0)
            .max_seq_len) == (2, 2048)
    one_byte_less = (_total("codellama-7b", 1, 2, 2048) - 1) / GIB
    assert _plan("codellama-7b", 1, one_byte_less, fraction=1.0).max_batch == 1


def test_then_a_shorter_context_in_one_slot():
    exact = _total("codellama-7b", 1, 1, 1024) / GIB
    p = _plan("codellama-7b", 1, exact, fraction=1.0)
    assert (p.max_batch, p.max_seq_len) == (1, 1024)  # 1280 would not fit; multiples of 256


def test_never_more_than_the_defaults():
    p = _plan("codellama-7b", 8, 10_000)
    assert (p.max_seq_len, p.max_batch) == (2048, 4)


def test_given_sizes_are_only_checked():
    assert _plan("codellama-7b", 1, 64, max_seq_len=4096, max_batch=8).max_seq_len == 4096
    with pytest.raises(MemoryPlanError, match=r"max_batch 4 x max_seq_len 2048.*use a smaller --max-seq-len / "
                                              r"--max-batch, or a larger --tp than 1"):
        _plan("codellama-7b", 1, 18, max_seq_len=2048, max_batch=4)


# --- available memory -------------------------------------------------------------------------------------


def test_cpu_memory_is_memavailable_shared_by_the_hosts_ranks(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:         100 kB\nMemAvailable:    8388608 kB\n")
    assert mp.available_memory("cpu", meminfo=meminfo).bytes == 8 * GIB
    two = mp.available_memory("cpu", local_ranks=2, meminfo=meminfo)
    assert two.bytes == 4 * GIB and "8.00 GiB MemAvailable / 2 ranks" in two.source
    meminfo.write_text("MemTotal: 1 kB\n")
    with pytest.raises(MemoryPlanError, match="no MemAvailable line; give --device-memory"):
        mp.available_memory("cpu", meminfo=meminfo)


def test_the_override_wins_on_every_device():
    for device in ("cpu", "ascend", "gpu"):
        assert mp.available_memory(device, MemoryConfig(device_memory_gib=32)).bytes == 32 * GIB


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="nvidia-smi is here")
def test_an_accelerator_that_cannot_be_measured_asks_for_the_override():
    with pytest.raises(MemoryPlanError, match=r"cannot measure the memory of gpu device 0 with `nvidia-smi .*"
                                              r"give --device-memory GiB"):
        mp.available_memory("gpu")


def test_memory_settings_are_checked(monkeypatch):
    with pytest.raises(MemoryPlanError, match="--memory-fraction must be in"):
        MemoryConfig(fraction=1.5)
    with pytest.raises(MemoryPlanError, match="--device-memory must be a positive number of GiB, got -1"):
        MemoryConfig(device_memory_gib=-1)
    monkeypatch.setenv(mp.MEMORY_ENV, "24")
    assert MemoryConfig.from_flags(None, None) == MemoryConfig(24.0, 0.9)
    assert MemoryConfig.from_flags(8, 0.5) == MemoryConfig(8, 0.5)
    monkeypatch.setenv(mp.MEMORY_ENV, "lots")
    with pytest.raises(MemoryPlanError, match=r"\$CODEFILL_DEVICE_MEMORY must be a number of GiB, got 'lots'"):
        MemoryConfig.from_flags(None, None)


# --- end to end: refused before loading -------------------------------------------------------------------


@pytest.fixture(scope="module")
def unloadable_model_dir(tmp_path_factory):
    """A model whose config reads but whose weights file is garbage: only a refusal that comes before
    loading can name memory instead of the broken file."""
    src = make_tiny_model_dir(tmp_path_factory, preset="tiny-gqa")
    out = tmp_path_factory.mktemp("unloadable") / "model"
    shutil.copytree(src, out)
    (out / "model.safetensors").write_bytes(b"not a safetensors file")
    return out


def test_a_worker_with_too_little_memory_refuses_before_loading_weights(unloadable_model_dir):
    from codefill.inference_workers.client import WorkerError
    from codefill.inference_workers.startup import spawn_worker

    with pytest.raises(WorkerError) as e:
        spawn_worker(unloadable_model_dir, device_memory_gib=0.001, timeout_s=120)
    msg = str(e.value)
    assert "MemoryPlanError: the model does not fit on cpu" in msg
    assert "working space 0.56 GiB" in msg and "> available 0.9 MiB (90% of 1.0 MiB given by --device-memory)" in msg
    assert "safetensors" not in msg.split("Traceback")[0]


def test_workers_with_too_little_memory_start_no_rank(unloadable_model_dir, monkeypatch, capsys):
    import codefill.inference_workers.launch as launch

    monkeypatch.setattr(launch, "start_job", lambda *a, **k: pytest.fail("msrun started"))
    code = codefill.cli.main(["workers", "--model", str(unloadable_model_dir), "--tp", "2", "--device-memory", "0.001"])
    err = capsys.readouterr().err
    assert code == 2 and "the model does not fit on cpu (rank shard of tp 2" in err
