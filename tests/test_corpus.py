"""`codefill data corpus`: licences, skip rules, de-duplication, held-out packages, the HumanEval filter, the data
card, shards and determinism, on small source distributions built here (no network: --source-dir)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from codefill.bundled import bundled_model_dir
from codefill.training.corpus import CorpusConfig, build_corpus
from codefill.training.corpus_shards import Doc, read_docs, shard_paths, write_shards
from codefill.training.data_error import DataError
from codefill.training.humaneval_filter import HumanEvalFilter
from codefill.training.licenses import file_verdict, metadata_verdict, package_verdict
from codefill.training.near_duplicates import NearDuplicateIndex, signature, similarity
from codefill.training.sdists import Pin, fetch, read_pins

MIT = ("MIT License\n\nPermission is hereby granted, free of charge, to any person obtaining a copy of this software "
       "and associated documentation files...\n")
BSD = ("Redistribution and use in source and binary forms, with or without modification, are permitted provided "
       "that the following conditions are met:\n")
GPL = "GNU GENERAL PUBLIC LICENSE\nVersion 3, 29 June 2007\n"


def pkg_info(name: str, license: str = "", classifiers=(), expression: str = "") -> str:
    lines = ["Metadata-Version: 2.4", f"Name: {name}", "Version: 1.0"]
    if expression:
        lines.append(f"License-Expression: {expression}")
    if license:
        lines.append(f"License: {license}")
    lines += [f"Classifier: {c}" for c in classifiers]
    return "\n".join(lines) + "\n"


def module(seed: int, lines: int = 30) -> str:
    """A distinct, ordinary Python module (distinct enough that no two seeds are near duplicates)."""
    body = [f"def function_{seed}_{i}(value_{i}, scale={seed * 7 + i}):\n"
            f"    total = value_{i} * scale + {seed * 13 + i * 3}\n"
            f"    return [item_{seed} for item_{seed} in range(total) if item_{seed} % {i + 2} == {seed % 5}]\n"
            for i in range(lines // 3)]
    return f'"""Module {seed}."""\n\nimport os\n\n\n' + "\n\n".join(body)


def make_sdist(directory: Path, name: str, files: dict[str, str | bytes], info: str, licenses: dict[str, str]) -> Pin:
    path = directory / f"{name}-1.0.tar.gz"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        members = {"PKG-INFO": info, **licenses, **files}
        for rel, content in sorted(members.items()):
            data = content if isinstance(content, bytes) else content.encode()
            ti = tarfile.TarInfo(f"{name}-1.0/{rel}")
            ti.size, ti.mtime = len(data), 0
            tar.addfile(ti, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return Pin(name, "1.0", hashlib.sha256(path.read_bytes()).hexdigest(), path.name)


SIGNATURE = "def has_close_elements(numbers: List[float], threshold: float) -> bool:"


@pytest.fixture
def sources(tmp_path) -> tuple[Path, Path]:
    """(source dir, pins file): five packages, two refused, one held out."""
    src = tmp_path / "sdists"
    src.mkdir()
    shared = module(100, 60)
    pins = [
        make_sdist(src, "alpha", {"alpha/__init__.py": module(1), "alpha/core.py": shared,
                                  "alpha/copy_of_core.py": shared,  # exact duplicate
                                  "alpha/near.py": shared.replace("    ", "\t") + "\n# a comment\n",  # near
                                  "alpha/_vendor/six.py": module(2), "alpha/msg_pb2.py": module(3),
                                  "alpha/gen.py": "# This file is auto-generated. DO NOT EDIT.\n" + module(4),
                                  "alpha/mini.py": "x = [" + ", ".join(str(i) for i in range(600)) + "]\n",
                                  "alpha/huge.py": module(5, 3000),
                                  "alpha/contaminated.py": f"from typing import List\n\n{SIGNATURE}\n    return True\n",
                                  "alpha/README.txt": "not python"},
                   pkg_info("alpha", classifiers=["License :: OSI Approved :: MIT License"]), {"LICENSE": MIT}),
        make_sdist(src, "beta", {"beta/b.py": module(10), "beta/alpha_core_copy.py": shared},
                   pkg_info("beta", expression="BSD-3-Clause"), {"LICENSE.txt": BSD}),
        make_sdist(src, "gamma", {"gamma/g.py": module(20)}, pkg_info("gamma", license="GPL-3.0"), {"COPYING": GPL}),
        make_sdist(src, "delta", {"delta/d.py": module(30)}, pkg_info("delta", expression="MIT"), {"LICENSE": GPL}),
        make_sdist(src, "held", {"held/h.py": module(40), "held/h2.py": module(41)},
                   pkg_info("held", license="Apache 2.0"),
                   {"LICENSE": "Apache License\n  Version 2.0, January 2004\n"}),
    ]
    pins_file = tmp_path / "pins.txt"
    pins_file.write_text("# test pins\n" + "\n".join(p.line() for p in pins) + "\n")
    return src, pins_file


def config_of(pins_file: Path, **kw) -> CorpusConfig:
    return CorpusConfig(name="test", pins=pins_file, held_out=("held",), stdlib=False, max_file_bytes=20_000, **kw)


def build(tmp_path, src, pins_file, out="corpus", tokenizer=None, **kw) -> dict:
    return build_corpus(config_of(pins_file, **kw), tmp_path / out, cache=tmp_path / "cache", source_dir=src,
                        tokenizer=tokenizer, log=lambda *_: None)


def test_corpus_admits_skips_dedups_and_holds_out(tmp_path, sources):
    src, pins_file = sources
    card = build(tmp_path, src, pins_file, tokenizer=bundled_model_dir() / "tokenizer.model")
    out = tmp_path / "corpus"
    packages = {p["name"]: p for p in card["packages"]}

    assert {r["name"]: r["reason"] for r in card["refused"]} == {
        "gamma": "metadata License 'GPL-3.0' is not permissive",
        "delta": "licence file LICENSE carries 'gnu general public license version 3'"}
    assert packages["alpha"]["licenses"] == ["MIT"] and packages["beta"]["licenses"] == ["BSD"]
    assert packages["alpha"]["skipped"] == {"duplicate": 1, "generated": 2, "humaneval": 1, "minified": 1,
                                            "near_duplicate": 1, "too_large": 1, "vendored": 1}
    # beta's copy of alpha/core.py is a duplicate across packages
    assert packages["beta"]["skipped"] == {"duplicate": 1} and packages["beta"]["files"] == 1
    assert card["humaneval_files"] == {"alpha/alpha/contaminated.py": "HumanEval/0"}

    train = [(d.package, d.path) for d in read_docs(shard_paths(out, "train"))]
    held = [(d.package, d.path) for d in read_docs(shard_paths(out, "heldout"))]
    # files are read in path order: the first copy (copy_of_core.py) is the one kept
    assert sorted(train) == [("alpha", "alpha/__init__.py"), ("alpha", "alpha/copy_of_core.py"), ("beta", "beta/b.py")]
    assert held == [("held", "held/h.py"), ("held", "held/h2.py")]
    assert card["held_out"] == ["held"] and card["totals"]["train_files"] == 3
    assert card["totals"]["train_tokens"] > 0 and packages["held"]["tokens"] > 0
    assert card["transport"]["token_xz_bytes"] > 0 and card["transport"]["fim_row_xz_bytes"] > 0
    assert card["transport"]["carry"] == ("text" if card["transport"]["text_xz_bytes"] <= card["transport"]["fim_row_xz_bytes"] else "rows")
    assert json.loads((out / "corpus.json").read_text()) == card
    md = (out / "CORPUS.md").read_text()
    assert "| alpha | 1.0 | train | MIT |" in md and "| gamma | 1.0 | GPL-3.0 is not permissive" not in md
    assert "| gamma | 1.0 | metadata License 'GPL-3.0' is not permissive |" in md
    assert set(card["carry"]["held_out_shards"]) == {p.name for p in shard_paths(out, "heldout")}


def test_held_out_package_wins_over_a_train_copy(tmp_path):
    """A held-out package's file copied into a train package stays out of training (held-out goes first)."""
    src = tmp_path / "sdists"
    src.mkdir()
    shared = module(7)
    pins = [make_sdist(src, "aaa", {"aaa/copy.py": shared, "aaa/own.py": module(8)}, pkg_info("aaa", expression="MIT"),
                       {"LICENSE": MIT}),
            make_sdist(src, "zzz", {"zzz/orig.py": shared}, pkg_info("zzz", expression="MIT"), {"LICENSE": MIT})]
    (tmp_path / "pins.txt").write_text("\n".join(p.line() for p in pins))
    config = CorpusConfig(name="t", pins=tmp_path / "pins.txt", held_out=("ZZZ",), stdlib=False)
    build_corpus(config, tmp_path / "out", source_dir=src, tokenizer=None, log=lambda *_: None)
    assert [d.path for d in read_docs(shard_paths(tmp_path / "out", "train"))] == ["aaa/own.py"]
    assert [d.path for d in read_docs(shard_paths(tmp_path / "out", "heldout"))] == ["zzz/orig.py"]


def test_corpus_is_deterministic(tmp_path, sources):
    src, pins_file = sources
    cards = [build(tmp_path, src, pins_file, out=f"c{i}") for i in range(2)]
    for card in cards:
        card.pop("build_seconds")
    assert cards[0] == cards[1]
    for a, b in zip(shard_paths(tmp_path / "c0", "train"), shard_paths(tmp_path / "c1", "train"), strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_shards_stay_under_the_limit(tmp_path):
    docs = [Doc("p", f"m{i}.py", module(i, 300)) for i in range(40)]
    infos = write_shards(docs, tmp_path, "train", max_bytes=6000, raw_bytes=10**6)
    assert len(infos) > 1 and all(i.bytes <= 6000 for i in infos)
    assert [p.stat().st_size for p in shard_paths(tmp_path, "train")] == [i.bytes for i in infos]
    assert list(read_docs(shard_paths(tmp_path, "train"))) == docs  # order and content kept


def test_stdlib_is_a_train_package(tmp_path, sources):
    src, pins_file = sources
    lib = tmp_path / "lib"
    (lib / "test").mkdir(parents=True)
    (lib / "json_like.py").write_text(module(50))
    (lib / "test" / "test_json_like.py").write_text(module(51))
    config = CorpusConfig(name="t", pins=pins_file, held_out=("held",), stdlib=True, max_file_bytes=20_000)
    card = build_corpus(config, tmp_path / "out", source_dir=src, stdlib_root=lib, tokenizer=None, log=lambda *_: None)
    stdlib = next(p for p in card["packages"] if p["name"] == "python-stdlib")
    assert stdlib["split"] == "train" and stdlib["files"] == 1 and stdlib["licenses"] == ["PSF"]


def test_bad_inputs_are_refused_with_their_values(tmp_path, sources):
    src, pins_file = sources
    with pytest.raises(DataError, match=r"not pinned: \['nope'\]"):
        build_corpus(CorpusConfig(name="t", pins=pins_file, held_out=("nope",), stdlib=False), tmp_path / "o",
                     source_dir=src, log=lambda *_: None)
    (tmp_path / "bad.txt").write_text("requests 2.0\n")
    with pytest.raises(DataError, match=r"bad.txt:1: expected 'NAME==VERSION sha256:HEX URL', got 'requests 2.0'"):
        read_pins(tmp_path / "bad.txt")
    pin = read_pins(pins_file)[0]
    (src / pin.filename).write_bytes(b"changed")
    with pytest.raises(DataError, match=f"is not the pinned {pin.sha256}"):
        fetch(pin, tmp_path / "cache", src)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("info,admitted", [
    (pkg_info("x", expression="MIT OR Apache-2.0"), True),
    (pkg_info("x", expression="MIT AND LGPL-2.1"), False),
    (pkg_info("x", license="BSD License", classifiers=["License :: OSI Approved :: BSD License"]), True),
    (pkg_info("x", classifiers=["License :: OSI Approved :: Mozilla Public License 2.0 (MPL 2.0)"]), False),
    (pkg_info("x", license="Proprietary"), False),
    (pkg_info("x", license="WTFPL"), False),
    (pkg_info("x", license=MIT.replace("\n", " ")), True),  # the whole text in the field
    (pkg_info("x"), False),  # nothing declared
    (pkg_info("x", license="ISC license", classifiers=["License :: OSI Approved :: ISC License (ISCL)"]), True),
])
def test_metadata_licences(info, admitted):
    assert metadata_verdict(info).admitted is admitted


def test_licence_files():
    assert file_verdict({"LICENSE": MIT}).licenses == ("MIT",)
    assert file_verdict({}).reason == "no LICENSE / COPYING file"
    assert not file_verdict({"LICENSE": "All rights reserved."}).admitted
    assert not file_verdict({"LICENSE": BSD, "licenses/LGPL.txt": "GNU Lesser General Public License, version 2.1"}).admitted
    # Python's own licence (bundled by Django, pandas, mypy...) mentions the GPL in its CNRI clause: still PSF
    psf = ("PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2\n... derivative works based on Python 1.6.1 that "
           "incorporate non-separable material that was previously distributed under the GNU General Public "
           "License (GPL), the law of the Commonwealth of Virginia shall govern ...")
    assert file_verdict({"LICENSE": BSD, "LICENSE.python": psf}).licenses == ("BSD", "PSF")
    mpl = "This Source Code Form is subject to the terms of the Mozilla Public License, v. 2.0."
    assert not file_verdict({"LICENSE": MIT, "licenses/MPL.txt": mpl}).admitted
    assert package_verdict(pkg_info("x", expression="PSF-2.0"),
                           {"LICENSE": "PSF LICENSE AGREEMENT FOR PYTHON"}).licenses == ("PSF",)


def test_near_duplicate_index():
    a = module(1, 90)
    index = NearDuplicateIndex(0.85)
    index.add("a", signature(a))
    assert index.find(signature(a.replace("    ", "  ") + "\n# trailing comment\n")) == "a"
    assert index.find(signature(module(2, 90))) is None
    assert signature("x = 1") is None and index.find(None) is None
    assert similarity(signature(a), signature(module(2, 90))) < 0.5


def test_humaneval_filter_finds_signatures_and_statements():
    f = HumanEvalFilter.default()
    assert f.match(f"x = 1\n    {SIGNATURE}  \n") == "HumanEval/0"
    statement = "Check if in given list of numbers, are any two numbers closer to each other than"
    assert f.match(f'"""\n   {statement}\n"""') == "HumanEval/0"
    assert f.match(module(3)) is None


def test_the_command_line_builds_from_a_source_dir(tmp_path, sources):
    from helpers import run_codefill

    src, pins_file = sources
    toml = tmp_path / "corpus.toml"
    toml.write_text(f'name = "cli"\npins = "{pins_file.name}"\nheld_out = ["held"]\nstdlib = false\n'
                    f'max_file_bytes = 20000\n')
    done = run_codefill("data", "corpus", toml, "--output", tmp_path / "out", "--source-dir", src,
                        "--cache", tmp_path / "cache")
    assert "- packages: 3 admitted, 2 refused" in done.stdout
    assert (tmp_path / "out" / "CORPUS.md").exists() and not (tmp_path / "cache").exists()  # nothing downloaded
    again = run_codefill("data", "corpus", toml, "--output", tmp_path / "out", "--source-dir", src, check=False)
    assert again.returncode == 2 and "exists; remove it or choose another" in again.stderr


def test_the_cache_is_used_and_verified_without_the_network(tmp_path, sources):
    src, pins_file = sources
    pin = read_pins(pins_file)[0]
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / pin.filename).write_bytes((src / pin.filename).read_bytes())
    assert fetch(pin, cache) == cache / pin.filename      # the pin names no URL: only the cache can serve it
    (cache / pin.filename).write_bytes(b"truncated")
    with pytest.raises(DataError, match="is not the pinned"):
        fetch(pin, cache)
    (cache / pin.filename).unlink()
    with pytest.raises(DataError, match="is not cached and the pin has no URL"):
        fetch(pin, cache)
