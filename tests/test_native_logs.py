"""MindSpore's native log lines never reach the terminal of a `codefill` command; they go to the log
directory, which errors name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from codefill import native_logs
from codefill.inference_workers.launch import msrun_env
from helpers import make_tiny_model_dir

CODEFILL = [sys.executable, "-m", "codefill.cli"]


def clean_env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLOG_")}
    env["CODEFILL_CACHE"] = str(cache)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return env


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*CODEFILL, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory)


def test_generate_prints_no_native_log_lines(tiny_dir, tmp_path):
    """`codefill generate` on the tiny model with the stock ops (CODEFILL_KERNELS=reference; the CPU kernels
    happen not to trigger it): its graphs make MindSpore warn (expander_fallback) unless told otherwise; the
    control run with MindSpore's own defaults shows that they do."""
    args = ["generate", "--model", str(tiny_dir), "--prompt-ids", "1,5,6,7", "--max-new-tokens", "4"]
    done = run(args, clean_env(tmp_path / "cache") | {"CODEFILL_KERNELS": "reference"})
    assert done.returncode == 0, done.stderr
    for stream in (done.stdout, done.stderr):
        assert "[WARNING]" not in stream and "[ERROR]" not in stream and "expander" not in stream, stream
    assert list((tmp_path / "cache" / "logs").glob("rank_*/logs/mindspore*")), "no MindSpore log file written"
    control = clean_env(tmp_path / "cache2") | {"GLOG_v": "2", "GLOG_logtostderr": "1",  # the user's choice wins
                                               "CODEFILL_KERNELS": "reference"}
    loud = run(args, control)
    assert loud.returncode == 0 and "[WARNING]" in loud.stderr, loud.stderr[-2000:]


def test_an_error_names_the_log_directory(tiny_dir, tmp_path):
    done = run(["generate", "--model", str(tiny_dir), "--prompt-ids", "1,2", "--max-new-tokens", "100000"],
               clean_env(tmp_path / "cache"))
    assert done.returncode == 2 and "codefill: error:" in done.stderr, done.stderr
    assert f"MindSpore's native log: {tmp_path / 'cache' / 'logs'}/rank_*/logs/" in done.stderr, done.stderr


def test_spawned_processes_get_the_quiet_environment(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("GLOG_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CODEFILL_CACHE", str(tmp_path))
    env = msrun_env(2)  # what msrun and every rank it starts inherit
    assert env["GLOG_v"] == "3" and env["GLOG_logtostderr"] == "0" and env["GLOG_stderrthreshold"] == "4"
    assert env["GLOG_log_dir"] == str(tmp_path / "logs")
    monkeypatch.setenv("GLOG_v", "1")
    assert native_logs.quiet_env(dict(os.environ))["GLOG_v"] == "1"  # set by the user: kept
