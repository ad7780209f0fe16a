"""One base error: every boundary's error type is a CodefillError, which the CLI prints as one line (exit 2)."""

import importlib
import re

import pytest

from codefill.errors import CodefillError, registered

# (module, class, the built-in base it keeps so that existing `except ValueError` code still catches it)
BOUNDARY_ERRORS = [
    ("codefill.model.tokenizer", "TokenizerError", ValueError),
    ("codefill.model.sampling", "SamplingError", ValueError),
    ("codefill.model.config", "ConfigError", ValueError),
    ("codefill.model.safetensors_io", "SafetensorsError", ValueError),
    ("codefill.model.checkpoint", "CheckpointError", ValueError),
    ("codefill.evaluation.eval_error", "EvalError", Exception),
    ("codefill.training.data_error", "DataError", ValueError),
    ("codefill.training.train_error", "TrainError", ValueError),
    ("codefill.lsp.transport", "TransportError", ValueError),
    ("codefill.lsp.settings", "SettingsError", ValueError),
    ("codefill.lsp.prompt", "PromptError", ValueError),
    ("codefill.lsp.context", "ContextError", ValueError),
    ("codefill.http_api.schema", "HttpError", ValueError),
    ("codefill.inference_workers.protocol", "WireError", ValueError),
    ("codefill.inference_workers.client", "WorkerError", RuntimeError),
    ("codefill.inference_workers.stops", "StopRuleError", ValueError),
    ("codefill.cli", "CliError", Exception),
    ("codefill.model.llama", "WeightError", ValueError),
    ("codefill.inference_workers.runner", "GenerationError", ValueError),
    ("codefill.inference_workers.sharding", "TensorParallelError", ValueError),
    ("codefill.inference_workers.launch", "LaunchError", RuntimeError),
    ("codefill.model.device", "DeviceError", Exception),
    ("codefill.model.precision", "PrecisionError", ValueError),
    ("codefill.inference_workers.memory_plan", "MemoryPlanError", Exception),
]


@pytest.mark.parametrize("module,name,builtin", BOUNDARY_ERRORS, ids=[n for _, n, _ in BOUNDARY_ERRORS])
def test_every_boundary_error_is_a_codefill_error_and_keeps_its_builtin_base(module, name, builtin):
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, CodefillError) and issubclass(cls, builtin)
    assert cls in registered()


def test_a_codefill_error_in_a_subcommand_is_one_line_and_exit_2(monkeypatch, capsys):
    import codefill.cli
    from codefill.model.config import ConfigError

    def fail(args):
        raise ConfigError("n_heads 3 does not divide dim 64")

    monkeypatch.setattr(codefill.cli, "cmd_keys", fail)
    assert codefill.cli.main(["keys", "--output", "unused", "--name", "x"]) == 2
    captured = capsys.readouterr()
    # one line; once MindSpore is loaded in the process (earlier tests), it also names its log directory
    assert re.fullmatch(r"codefill: error: n_heads 3 does not divide dim 64( \(MindSpore's native log: \S+\))?\n",
                        captured.err), captured.err
    assert captured.out == ""


def test_any_other_error_in_a_subcommand_keeps_its_traceback(monkeypatch):
    import codefill.cli

    def bug(args):
        raise KeyError("a bug")

    monkeypatch.setattr(codefill.cli, "cmd_keys", bug)
    with pytest.raises(KeyError, match="a bug"):
        codefill.cli.main(["keys", "--output", "unused", "--name", "x"])
