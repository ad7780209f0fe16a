"""`codefill data corpus CORPUS.toml --output DIR`: a permissively licensed Python corpus from pinned PyPI
source distributions plus the standard library, as compressed text shards with a data card.

A corpus file (recipes/corpus/pypi.toml) names the pins file (sdists.py), the held-out packages and the
limits below. Packages are read in this order, so that the first copy of a file wins and held-out code never
also reaches training under another package's name: the held-out packages, the standard library, the rest in
pins order. For each package:

  licence     admitted only when its metadata and its licence files are both permissive (licenses.py); a
              refused package is counted with its reason and none of its files is read further
  files       only `.py` files, each skipped, with its reason counted, by the first rule that applies:
    1 vendored        a folder named as in VENDORED_DIRS (`_vendor/`, `third_party/`, ...) on its path
    2 too_large       over max_file_bytes ("huge": data tables, generated parsers)
    3 generated       a generated name (GENERATED_NAMES: `*_pb2.py`, `parsetab.py`, ...) or, as for every
                      source (source_files.skip_reason), a generated marker in the first lines
    4 minified ...    the rest of source_files.skip_reason: empty, binary, not_utf8, minified (a line over
                      max_line_chars or a mean line over max_mean_line_chars)
    5 humaneval       the text of a HumanEval problem (humaneval_filter.py)
    6 duplicate       the same bytes as a file kept before
    7 near_duplicate  MinHash similarity >= near_threshold with a file kept before (near_duplicates.py)

Outputs in DIR (written into DIR.tmp and renamed, so DIR is whole or absent):
  train-NNNNN.jsonl.xz     the training files, in an order fixed by hashes of their names (every shard is a
                           mix of packages, so any prefix of shards is a fair sample); each under shard_mib
  heldout-NNNNN.jsonl.xz   the held-out packages' files
  corpus.json, CORPUS.md   the data card (corpus_card.py)
  heldout-files/           written on first use by held_out_tree: the held-out files as a folder tree, for
                           `codefill eval infill --recipe` (held-out FIM reads files)
Archives are cached (CACHE/sdists, default ~/.cache/codefill/corpus) and checked against their pinned
SHA-256; `--source-dir` reads them from a folder instead and never uses the network.
"""

from __future__ import annotations

import hashlib
import platform
import re
import sysconfig
import tarfile
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .corpus_shards import Doc, MIB, write_shards
from .data_error import DataError
from .humaneval_filter import HumanEvalFilter
from .licenses import is_license_file, package_verdict
from .near_duplicates import NearDuplicateIndex, signature
from .sdists import Pin, fetch, read_pins
from .source_files import SourceConfig, iter_source_files, skip_reason

VENDORED_DIRS = frozenset({"_vendor", "vendor", "vendored", "_vendored", "third_party", "thirdparty", "3rdparty",
                           "extern", "externals", "_extern", "site-packages", "node_modules"})
GENERATED_NAMES = re.compile(r"(_pb2(_grpc)?\.py|^parsetab\.py|^lextab\.py|_parsetab\.py)$")
STDLIB_NAME = "python-stdlib"
STDLIB_EXCLUDE = ("site-packages/*", "dist-packages/*", "test/*", "*/test/*", "*/tests/*", "*/idle_test/*",
                  "test_*.py", "*/test_*.py", "lib2to3/*", "idlelib/*", "turtledemo/*")
DEFAULT_CACHE = Path.home() / ".cache" / "codefill" / "corpus"


@dataclass(frozen=True)
class CorpusConfig:
    name: str
    pins: Path
    held_out: tuple[str, ...] = ()        # package names (as pinned, any case)
    stdlib: bool = True                   # add this interpreter's standard library (PSF licence)
    max_file_bytes: int = 300_000
    max_line_chars: int = 1000
    max_mean_line_chars: float = 100.0
    near_threshold: float = 0.85
    shard_mib: float = 16.0               # the largest shard file
    raw_shard_mib: float = 64.0           # uncompressed text per shard before compression
    carry_mib: float = 50.0               # what may travel to the GPU machine: the card names the shards that fit
    xz_preset: int = 6

    def __post_init__(self):
        object.__setattr__(self, "held_out", tuple(self.held_out))
        if not 0.0 < self.near_threshold <= 1.0:
            raise DataError(f"near_threshold must be in (0, 1], got {self.near_threshold}")
        if min(self.max_file_bytes, self.max_line_chars, self.max_mean_line_chars, self.shard_mib,
               self.raw_shard_mib, self.carry_mib) <= 0:
            raise DataError(f"corpus limits must be positive: {self}")

    @classmethod
    def load(cls, path: str | Path) -> "CorpusConfig":
        """From a TOML file; `pins` is relative to the file's folder."""
        path = Path(path)
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise DataError(f"cannot read corpus file {path}: {e}") from e
        if "pins" not in doc:
            raise DataError(f"corpus file {path}: `pins` (the pins file) is required")
        doc["pins"] = path.parent / doc["pins"]
        doc.setdefault("name", path.stem)
        try:
            return cls(**doc)
        except TypeError as e:
            raise DataError(f"corpus file {path}: {e}") from e


@dataclass
class PackageReport:
    name: str
    version: str
    sha256: str
    split: str                          # "train", "held_out" or "refused"
    licenses: tuple[str, ...] = ()
    metadata_license: str = ""
    refused: str = ""
    files: int = 0
    chars: int = 0
    tokens: int = 0
    skipped: Counter = field(default_factory=Counter)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _read_sdist(path: Path) -> tuple[str, dict[str, str], list[tuple[str, bytes]]]:
    """(PKG-INFO text, licence files {path: text}, [(path, bytes)] of the .py files) of a .tar.gz sdist;
    paths are relative to the archive's top folder."""
    pkg_info, licenses, sources = "", {}, []
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile() or "/" not in member.name:
                    continue
                rel = member.name.split("/", 1)[1]
                wanted = rel == "PKG-INFO" or is_license_file(rel) or rel.endswith(".py")
                if not wanted:
                    continue
                data = tar.extractfile(member).read()
                if rel == "PKG-INFO":
                    pkg_info = data.decode("utf-8", errors="replace")
                elif is_license_file(rel):
                    licenses[rel] = data.decode("utf-8", errors="replace")
                else:
                    sources.append((rel, data))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read source distribution {path}: {e}") from e
    if not pkg_info:
        raise DataError(f"{path} has no top-level PKG-INFO: not a source distribution")
    return pkg_info, licenses, sorted(sources)


def _metadata_license(pkg_info: str) -> str:
    from email.parser import HeaderParser

    msg = HeaderParser().parsestr(pkg_info)
    value = msg.get("License-Expression") or msg.get("License") or ""
    classifiers = [c.rsplit("::", 1)[-1].strip() for c in msg.get_all("Classifier") or [] if c.startswith("License")]
    short = " ".join(value.split())[:60]
    return "; ".join(x for x in (short, ", ".join(classifiers)) if x)


class _Filter:
    """The per-file rules 1-7 of the module docstring, with the state de-duplication needs."""

    def __init__(self, config: CorpusConfig, humaneval: HumanEvalFilter):
        self.config, self.humaneval = config, humaneval
        self.sources = SourceConfig(max_file_bytes=config.max_file_bytes, max_line_chars=config.max_line_chars,
                                    max_mean_line_chars=config.max_mean_line_chars)
        self.hashes: set[bytes] = set()
        self.near = NearDuplicateIndex(config.near_threshold)
        self.contaminated: dict[str, str] = {}   # "package/path" -> HumanEval task_id

    def reason(self, package: str, rel: str, data: bytes) -> tuple[str | None, str]:
        parts = rel.split("/")
        if any(p in VENDORED_DIRS for p in parts[:-1]):
            return "vendored", ""
        if len(data) > self.config.max_file_bytes:
            return "too_large", ""
        if GENERATED_NAMES.search(parts[-1]):
            return "generated", ""
        why, text = skip_reason(rel, data, self.sources)
        if why is not None:
            return why, ""
        task = self.humaneval.match(text)
        if task is not None:
            self.contaminated[f"{package}/{rel}"] = task
            return "humaneval", ""
        digest = hashlib.sha256(data).digest()
        if digest in self.hashes:
            return "duplicate", ""
        self.hashes.add(digest)
        sig = signature(text)
        if self.near.find(sig) is not None:
            return "near_duplicate", ""
        self.near.add(f"{package}/{rel}", sig)
        return None, text


def _stdlib_files(root: Path, skipped: Counter) -> list[tuple[str, bytes]]:
    """The standard library's .py files (STDLIB_EXCLUDE left out); what its listing skips goes to `skipped`."""
    from .source_files import SourceSummary

    config = SourceConfig(max_file_bytes=10**9, extensions=(".py",), held_out_fraction=0.0, exclude=STDLIB_EXCLUDE)
    summary = SourceSummary()
    files = [(f.path, f.text.encode("utf-8")) for f in iter_source_files(root, config, summary)]
    skipped.update({k: v for k, v in summary.skipped.items() if k not in ("excluded", "extension")})
    return files


def build_corpus(config: CorpusConfig, out: str | Path, *, cache: Path = DEFAULT_CACHE,
                 source_dir: Path | None = None, stdlib_root: Path | None = None, tokenizer: Path | None = None,
                 humaneval: HumanEvalFilter | None = None, log=print) -> dict:
    """Build the corpus into OUT (see the module docstring); returns the card's JSON."""
    from .corpus_card import write_card

    out = Path(out)
    if out.exists():
        raise DataError(f"output {out} exists; remove it or choose another")
    pins = read_pins(config.pins)
    known = {_norm(p.name) for p in pins}
    held = {_norm(n) for n in config.held_out}
    if held - known:
        raise DataError(f"held_out names packages that are not pinned: {sorted(held - known)}")
    tok = _token_counter(tokenizer)
    humaneval = humaneval if humaneval is not None else HumanEvalFilter.default()
    files = _Filter(config, humaneval)
    started = time.time()
    order: list[tuple[str, Pin | None]] = [("held_out", p) for p in pins if _norm(p.name) in held]
    if config.stdlib:
        order.append(("train", None))
    order += [("train", p) for p in pins if _norm(p.name) not in held]
    reports: list[PackageReport] = []
    docs: dict[str, list[Doc]] = {"train": [], "held_out": []}
    for split, pin in order:
        if pin is None:
            root = stdlib_root or Path(sysconfig.get_paths()["stdlib"])
            report = PackageReport(STDLIB_NAME, platform.python_version(), "", split, ("PSF",),
                                   "PSF-2.0 (the Python standard library)")
            sources = _stdlib_files(root, report.skipped)
        else:
            archive = fetch(pin, cache / "sdists", source_dir)
            pkg_info, license_texts, sources = _read_sdist(archive)
            verdict = package_verdict(pkg_info, license_texts)
            report = PackageReport(pin.name, pin.version, pin.sha256, split, verdict.licenses,
                                   _metadata_license(pkg_info))
            if not verdict.admitted:
                report.split, report.refused = "refused", verdict.reason
                reports.append(report)
                log(f"refused {pin.name}=={pin.version}: {verdict.reason}")
                continue
        for rel, data in sources:
            why, text = files.reason(report.name, rel, data)
            if why is not None:
                report.skipped[why] += 1
                continue
            docs[split].append(Doc(report.name, rel, text))
            report.files += 1
            report.chars += len(text)
            report.tokens += tok(text)
        reports.append(report)
        log(f"{split} {report.name}=={report.version}: {report.files} files, {report.chars:,} chars, "
            f"skipped {dict(report.skipped)}")
    if not docs["train"]:
        raise DataError("no training file was admitted; see the refusals above")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    key = lambda d: hashlib.sha256(f"{d.package}/{d.path}".encode()).digest()
    limits = dict(max_bytes=int(config.shard_mib * MIB), raw_bytes=int(config.raw_shard_mib * MIB),
                  preset=config.xz_preset)
    shards = {"train": write_shards(sorted(docs["train"], key=key), tmp, "train", **limits),
              "held_out": write_shards(docs["held_out"], tmp, "heldout", **limits) if docs["held_out"] else []}
    card = write_card(tmp, config, reports, shards, files.contaminated, tokenizer, round(time.time() - started, 1))
    tmp.rename(out)
    return card


def _token_counter(tokenizer: Path | None):
    if tokenizer is None:
        return lambda text: 0
    from codefill.model.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer)
    return lambda text: len(tok.encode(text))


def held_out_tree(corpus_dir: str | Path) -> Path:
    """CORPUS/heldout-files/PACKAGE/PATH: the held-out shards' files on disk (written once, atomically)."""
    from .corpus_shards import read_docs, shard_paths

    corpus_dir = Path(corpus_dir)
    tree = corpus_dir / "heldout-files"
    if tree.is_dir():
        return tree
    paths = shard_paths(corpus_dir, "heldout")
    if not paths:
        raise DataError(f"corpus {corpus_dir} has no heldout-*.jsonl.xz shards: no package was held out")
    tmp = corpus_dir / "heldout-files.tmp"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    for doc in read_docs(paths):
        target = tmp / doc.package / doc.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(doc.text, encoding="utf-8")
    tmp.rename(tree)
    return tree
