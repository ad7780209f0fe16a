"""The VS Code extension in a real VS Code (code-server 4.100.3 = VS Code 1.100.3, in headless Chromium).

code-server installs editor_clients/vscode/codefill.vsix into a temporary HOME; the extension starts the
real `codefill serve --stdio` on a FAKE worker (tests/lsp_fake_worker.py, a scripted reply). A puppeteer
script (editor_clients/vscode/e2e/drive.js) opens a Python file, types, waits for the ghost text, saves a
screenshot and accepts with Tab; the test asserts the (auto-saved) file on disk.

Also here, without an editor: package.json's `codefill.server.*` settings mirror lsp/settings.py.
Run by scripts/test_editors.sh (CODEFILL_EDITOR_TESTS=1) after scripts/setup_editors.sh.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from test_editor_nvim import editor_env, fake, tiny_dir  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
EXT = ROOT / "editor_clients" / "vscode"
VSIX = EXT / "codefill.vsix"
DEPS = ROOT / "editor_clients" / ".deps" / "code-server" / "node_modules"
CODE_SERVER = DEPS / ".bin" / "code-server"
CHROMIUM = shutil.which("chromium")

SOURCE = '"""Arithmetic helpers."""\n\n\ndef add(a, b):\n    """The sum of a and b."""\n'
REPLY = "total = a + b\n    return total"  # two lines: ghost text, and a ghost line below it
ACCEPTED = SOURCE + "    " + REPLY


def test_settings_mirror_the_server():
    """Every server setting is a `codefill.server.<key>` with the server's default, and nothing else is."""
    from codefill.lsp.settings import table

    props = json.loads((EXT / "package.json").read_text())["contributes"]["configuration"]["properties"]
    mirrored = {k[len("codefill.server."):]: v for k, v in props.items() if k.startswith("codefill.server.")}
    server = {key: list(default) if isinstance(default, tuple) else default for key, default, _ in table()}
    assert sorted(mirrored) == sorted(server)
    for key, default in server.items():
        assert mirrored[key]["default"] == default, key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(os.environ.get("CODEFILL_EDITOR_TESTS") != "1",
                    reason="real-editor tests: run scripts/test_editors.sh (CODEFILL_EDITOR_TESTS=1)")
@pytest.mark.skipif(not CODE_SERVER.exists() or CHROMIUM is None or not VSIX.exists(),
                    reason="no code-server, chromium or codefill.vsix: run scripts/setup_editors.sh")
def test_ghost_text_in_vscode(tmp_path, tiny_dir, fake):  # noqa: F811
    home = tmp_path / "home"
    data, extensions, work = home / "data", home / "extensions", tmp_path / "work"
    for d in (data / "User", extensions, work):
        d.mkdir(parents=True)
    (work / "add.py").write_text(SOURCE)
    fake.reply = REPLY
    codefill = Path(sys.executable).parent / "codefill"
    (data / "User" / "settings.json").write_text(json.dumps({
        "security.workspace.trust.enabled": False,
        "workbench.startupEditor": "none",
        "workbench.tips.enabled": False,
        "telemetry.telemetryLevel": "off",
        "update.mode": "none",
        "extensions.autoCheckUpdates": False,
        "extensions.ignoreRecommendations": True,
        "chat.disableAIFeatures": True,
        "editor.minimap.enabled": False,
        "files.autoSave": "afterDelay",  # the test reads the accepted text from the file
        "files.autoSaveDelay": 200,
        "window.commandCenter": False,
        "workbench.colorTheme": "Default Dark Modern",
        "codefill.command": str(codefill),
        "codefill.model": str(tiny_dir),
        "codefill.server.endpoint": fake.endpoint,
        "codefill.server.token_healing": False,
        "codefill.server.context_chunks": 0,
        "codefill.server.log_dir": str(tmp_path / "state"),
        "codefill.trace.server": "verbose",  # the LSP traffic, in the extension's output log
    }))
    env = {**editor_env(tmp_path), "HOME": str(home)}
    common = [str(CODE_SERVER), "--user-data-dir", str(data), "--extensions-dir", str(extensions)]
    out = subprocess.run(common + ["--install-extension", str(VSIX)], env=env, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0 and "codefill" in out.stdout + out.stderr, out.stdout + out.stderr

    port = free_port()
    log = open(tmp_path / "code-server.log", "w")
    server = subprocess.Popen(common + ["--bind-addr", f"127.0.0.1:{port}", "--auth", "none",
                                        "--disable-telemetry", "--disable-update-check",
                                        "--disable-workspace-trust", "--disable-getting-started-override",
                                        str(work)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, \
                    (tmp_path / "code-server.log").read_text()
                time.sleep(0.5)
        png = tmp_path / "vscode-suggestion.png"
        drive = subprocess.run(
            ["node", str(EXT / "e2e" / "drive.js"), f"http://127.0.0.1:{port}/?folder={work}", "add.py",
             "    ", "total = a + b", str(png)],
            env={**env, "NODE_PATH": str(DEPS), "CHROMIUM": CHROMIUM}, capture_output=True, text=True, timeout=400)
        assert drive.returncode == 0, drive.stderr[-4000:] + (tmp_path / "code-server.log").read_text()[-4000:]
        result = json.loads(drive.stdout.strip().splitlines()[-1])
        assert "total = a + b" in result["ghost"] and "return total" in result["ghost"], result
        assert result["status"] and "codefill" in result["status"] and "ms" in result["status"], result
        assert result["text"] == ACCEPTED, result
        deadline = time.monotonic() + 20  # the tab is clean a moment before the file is written
        while (work / "add.py").read_text() != result["text"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (work / "add.py").read_text() == ACCEPTED
        assert fake.requests, "the suggestion came from the worker"
        if os.environ.get("CODEFILL_SCREENSHOT_DIR"):
            shutil.copy(png, Path(os.environ["CODEFILL_SCREENSHOT_DIR"]) / "vscode-suggestion.png")
    finally:
        os.killpg(server.pid, 15)
        server.wait(20)
        log.close()
