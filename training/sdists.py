"""Pinned PyPI source distributions: the pins file, and a download cache verified by SHA-256.

A pins file (recipes/corpus/pypi-pins.txt) has one source distribution a line, `#` comments allowed:

    NAME==VERSION sha256:HEX URL_OR_FILENAME

`codefill data pin NAME==VERSION ...` writes such lines from PyPI's JSON API
(https://pypi.org/pypi/NAME/VERSION/json, the sdist's URL and digest). Building a corpus then needs no API:
each archive is fetched from its URL into the cache (CACHE/FILENAME), or taken from `--source-dir`
(SOURCE_DIR/FILENAME, for tests and machines without a network). A download goes to FILENAME.part first and
continues from there (an HTTP Range request) after an interruption; a file is used only when its SHA-256 is
the pinned one, so a changed or corrupt archive is an error, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .data_error import DataError

PYPI_JSON = "https://pypi.org/pypi/{name}/{version}/json"
PYPI_PROJECT_JSON = "https://pypi.org/pypi/{name}/json"  # releases by version; for mirrors without the above
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+)\s+sha256:(?P<sha>[0-9a-f]{64})\s+"
                  r"(?P<where>\S+)$")


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    sha256: str
    url: str          # a URL, or only the file name (then the archive must be in --source-dir or the cache)

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def line(self) -> str:
        return f"{self.name}=={self.version} sha256:{self.sha256} {self.url}"


def read_pins(path: str | Path) -> list[Pin]:
    """The pins of a file, in file order; a malformed line or a package pinned twice is an error."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read pins file {path}: {e}") from e
    pins, seen = [], set()
    for lineno, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _PIN.match(line)
        if not m:
            raise DataError(f"{path}:{lineno}: expected 'NAME==VERSION sha256:HEX URL', got {raw!r}")
        key = m["name"].lower().replace("_", "-")
        if key in seen:
            raise DataError(f"{path}:{lineno}: {m['name']} is pinned twice")
        seen.add(key)
        pins.append(Pin(m["name"], m["version"], m["sha"], m["where"]))
    if not pins:
        raise DataError(f"pins file {path} pins nothing")
    return pins


def pin_from_pypi(requirement: str, timeout: float = 30.0) -> Pin:
    """NAME==VERSION -> its Pin, from PyPI's JSON API (the one source distribution of that release)."""
    name, sep, version = requirement.partition("==")
    if not sep or not name or not version:
        raise DataError(f"pin NAME==VERSION, got {requirement!r}")
    files, name_on_pypi = None, name
    for url in (PYPI_JSON.format(name=name, version=version), PYPI_PROJECT_JSON.format(name=name)):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                doc = json.load(r)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                continue
            raise DataError(f"cannot read {url}: {e}") from e
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read {url}: {e}") from e
        name_on_pypi = doc["info"]["name"]
        files = doc["urls"] if url.endswith(f"/{version}/json") else doc.get("releases", {}).get(version)
        break
    if files is None:
        raise DataError(f"{requirement}: PyPI has no such release")
    sdists = [u for u in files if u.get("packagetype") == "sdist"]
    if len(sdists) != 1:
        raise DataError(f"{requirement}: expected one source distribution on PyPI, found "
                        f"{[u.get('filename') for u in sdists]}")
    # Some mirrors of the API give URLs relative to it ("../../packages/packages/6c/..."): made absolute, and
    # PyPI's own ones written as files.pythonhosted.org, where they point.
    where = urllib.parse.urljoin(url, sdists[0]["url"]).replace("https://pypi.org/packages/packages/",
                                                                 "https://files.pythonhosted.org/packages/")
    return Pin(name_on_pypi, version, sdists[0]["digests"]["sha256"], where)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(url: str, part: Path, timeout: float) -> None:
    """Fetch `url` into `part`, continuing a partial file with a Range request."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            mode = "ab" if have and r.status == 206 else "wb"  # a server ignoring Range sends it all again
            with open(part, mode) as f:
                for block in iter(lambda: r.read(1 << 20), b""):
                    f.write(block)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # already whole
            return
        raise DataError(f"cannot download {url}: HTTP {e.code}") from e
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"cannot download {url} (rerun to continue from {part.stat().st_size if part.exists() else 0} "
                        f"bytes): {e}") from e


def fetch(pin: Pin, cache: Path, source_dir: Path | None = None, timeout: float = 60.0) -> Path:
    """The verified archive of `pin`: from source_dir when given (never downloaded), else the cache, downloading
    into it when missing."""
    if source_dir is not None:
        path = source_dir / pin.filename
        if not path.is_file():
            raise DataError(f"{pin.name}=={pin.version}: {path} does not exist (--source-dir)")
    else:
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / pin.filename
        if not path.is_file():
            if "://" not in pin.url:
                raise DataError(f"{pin.name}=={pin.version}: {path} is not cached and the pin has no URL")
            part = path.with_name(path.name + ".part")
            _download(pin.url, part, timeout)
            got = file_sha256(part)
            if got != pin.sha256:
                part.unlink()
                raise DataError(f"{pin.url}: SHA-256 {got} is not the pinned {pin.sha256}; the partial download "
                                f"was deleted")
            os.replace(part, path)
    got = file_sha256(path)
    if got != pin.sha256:
        raise DataError(f"{path}: SHA-256 {got} is not the pinned {pin.sha256} of {pin.name}=={pin.version}")
    return path
