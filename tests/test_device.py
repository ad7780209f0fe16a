"""Device selection (model/device.py): the name and where it comes from, the presence check, and every command
that runs the model failing fast, naming the device and what was looked for, when it is not here. No Ascend
or NVIDIA device is reachable from this machine: the accelerator paths are tested for their refusals."""

import glob
import json

import pytest

import codefill.cli
from codefill.model import device as dev
from codefill.model.device import DeviceError
from helpers import make_tiny_model_dir

needs_no_ascend = pytest.mark.skipif(bool(glob.glob("/dev/davinci[0-9]*")), reason="this machine has Ascend devices")
needs_no_gpu = pytest.mark.skipif(bool(glob.glob("/dev/nvidia[0-9]*")), reason="this machine has NVIDIA devices")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory, preset="tiny-gqa")


# --- names ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,key,target", [("cpu", "cpu", "CPU"), ("Ascend", "ascend", "Ascend"),
                                             ("GPU", "gpu", "GPU"), (" ascend ", "ascend", "Ascend")])
def test_names_map_to_mindspore_targets(name, key, target):
    assert dev.parse_device(name) == key
    assert dev.target(name) == target


def test_an_unknown_device_lists_the_choices():
    with pytest.raises(DeviceError, match=r"--device 'tpu' is not a device: choose one of cpu, ascend, gpu"):
        dev.parse_device("tpu")


def test_the_flag_wins_over_the_environment_which_wins_over_the_default(monkeypatch):
    monkeypatch.delenv(dev.DEVICE_ENV, raising=False)
    assert dev.device_setting(None) == "cpu"
    monkeypatch.setenv(dev.DEVICE_ENV, "gpu")
    assert dev.device_setting(None) == "gpu"
    assert dev.device_setting("ascend") == "ascend"
    monkeypatch.setenv(dev.DEVICE_ENV, "npu")
    with pytest.raises(DeviceError, match=r"\$CODEFILL_DEVICE 'npu' is not a device"):
        dev.device_setting(None)


def test_each_rank_binds_its_local_rank_from_msruns_device_id(monkeypatch):
    monkeypatch.delenv("DEVICE_ID", raising=False)
    assert dev.local_device_id() == 0
    monkeypatch.setenv("DEVICE_ID", "5")  # msrun: os.environ["DEVICE_ID"] = str(local_rank)
    assert dev.local_device_id() == 5
    monkeypatch.setenv("DEVICE_ID", "x")
    with pytest.raises(DeviceError, match="DEVICE_ID 'x'"):
        dev.local_device_id()


# --- presence ---------------------------------------------------------------------------------------------


def test_cpu_is_always_present():
    dev.check_device_present("cpu")


@needs_no_ascend
def test_ascend_without_devices_names_the_device_files_looked_for():
    with pytest.raises(DeviceError, match=r"no Ascend device is visible .*/dev/davinci\[0-9\]\*"):
        dev.check_device_present("ascend")


def test_device_files_without_the_plugin_name_mindsporess_load_error(monkeypatch, tmp_path):
    import mindspore as ms

    if ms.device_context.ascend.is_available():
        pytest.skip("MindSpore's Ascend plugin loads here")
    (tmp_path / "davinci0").touch()  # as if the driver were there
    monkeypatch.setitem(dev._DEVICE_FILES, "ascend", str(tmp_path / "davinci[0-9]*"))
    with pytest.raises(DeviceError, match=r"1 Ascend device file\(s\) found, but MindSpore's Ascend plugin is not "
                                          r"loaded \(.+\); install the CANN toolkit"):
        dev.check_device_present("ascend")


# --- every command fails fast -----------------------------------------------------------------------------


def _run(capsys, *argv) -> str:
    code = codefill.cli.main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    return err


def _forbid_ranks(monkeypatch):
    """Any msrun job started is a test failure: the device check must come first."""
    import codefill.inference_workers.launch as launch

    started = []
    monkeypatch.setattr(launch, "start_job", lambda *a, **k: started.append(a) or pytest.fail("msrun started"))
    return started


@needs_no_ascend
def test_generate_on_a_missing_ascend_fails_before_loading(capsys, model_dir):
    err = _run(capsys, "generate", "--model", str(model_dir), "--prompt", "def", "--max-new-tokens", "2",
               "--device", "ascend")
    assert "codefill: error: device ascend: no Ascend device is visible" in err and "/dev/davinci" in err


@needs_no_ascend
def test_generate_takes_the_device_from_the_environment(capsys, model_dir, monkeypatch):
    monkeypatch.setenv("CODEFILL_DEVICE", "ascend")
    err = _run(capsys, "infill", "--model", str(model_dir), "--prefix", "a", "--suffix", "b",
               "--max-new-tokens", "2")
    assert "no Ascend device is visible" in err


@needs_no_ascend
def test_worker_on_a_missing_ascend_fails_before_binding_or_loading(capsys, model_dir, tmp_path):
    ready = tmp_path / "ready.json"
    err = _run(capsys, "worker", "--model", str(model_dir), "--endpoint", f"ipc://{tmp_path}/w.sock",
               "--ready-file", str(ready), "--device", "ascend")
    assert "no Ascend device is visible" in err
    assert json.loads(ready.read_text())["status"] == "error"  # a parent waiting on it hears at once
    assert not (tmp_path / "w.sock").exists()


@needs_no_ascend
def test_spawn_worker_on_a_missing_ascend_starts_no_process(model_dir, monkeypatch):
    from codefill.inference_workers import startup

    monkeypatch.setattr(startup.subprocess, "Popen", lambda *a, **k: pytest.fail("a worker process started"))
    with pytest.raises(DeviceError, match="Ascend"):
        startup.spawn_worker(model_dir, device="ascend")


@needs_no_ascend
def test_workers_tp2_on_a_missing_ascend_starts_no_rank(capsys, model_dir, monkeypatch):
    started = _forbid_ranks(monkeypatch)
    err = _run(capsys, "workers", "--model", str(model_dir), "--tp", "2", "--device", "ascend")
    assert "no Ascend device is visible" in err and "/dev/davinci" in err
    assert started == []


@needs_no_ascend
@pytest.mark.parametrize("tp", ["1", "2"])
def test_train_on_a_missing_ascend_fails_before_reading_or_writing(capsys, model_dir, monkeypatch, tmp_path, tp):
    started = _forbid_ranks(monkeypatch)
    out = tmp_path / "out"
    err = _run(capsys, "train", "--model", str(model_dir), "--data", str(tmp_path / "missing.mindrecord"),
               "--output", str(out), "--full", "--tp", tp, "--device", "ascend")
    assert "no Ascend device is visible" in err
    assert not out.exists() and started == []


@needs_no_gpu
def test_serve_checks_the_device_of_the_worker_it_would_start(capsys, model_dir):
    err = _run(capsys, "serve", "--model", str(model_dir), "--device", "gpu")
    assert "device gpu: " in err and "GPU" in err


@pytest.mark.parametrize("argv", [["eval", "humaneval", "--limit", "1"], ["bench", "model"]])
def test_eval_and_bench_take_the_device(capsys, model_dir, argv):
    err = _run(capsys, *argv, "--model", str(model_dir), "--device", "tpu")
    assert "choose one of cpu, ascend, gpu" in err


def test_the_language_servers_worker_device_setting_is_checked():
    from codefill.lsp.settings import Settings, SettingsError

    assert Settings().worker_device == "cpu"
    assert Settings().merged({"worker_device": "ascend"}).worker_device == "ascend"
    with pytest.raises(SettingsError, match=r"setting worker_device = 'npu': must be one of cpu, ascend, gpu"):
        Settings().merged({"worker_device": "npu"})
