"""Which licences the corpus admits, read from a source distribution's metadata and from its licence files.

A package is admitted only when BOTH say permissive:
  metadata   PKG-INFO's `License-Expression` (SPDX), `License` (a name or the whole text) and its
             `Classifier: License :: ...` lines; every licence named there must be permissive, and at least
             one must be named;
  files      the top-level LICENSE* / LICENCE* / COPYING* files (and any under a top-level licenses/ or
             LICENSES/ folder): at least one permissive licence text is recognised and no copyleft text is
             present.
Permissive here is MIT, BSD (0/2/3-clause), Apache-2.0, PSF and ISC; anything else (GPL, LGPL, AGPL, MPL,
EPL, "Proprietary", an unknown name or a text we do not recognise) is refused with its reason.

Pure functions on strings: the builder (corpus.py) reads the files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.parser import HeaderParser

PERMISSIVE = ("MIT", "BSD", "Apache-2.0", "PSF", "ISC")

# SPDX identifiers (case-insensitive) -> our family name; anything not listed is not permissive.
_SPDX = {
    "mit": "MIT", "mit-0": "MIT", "bsd-2-clause": "BSD", "bsd-3-clause": "BSD", "0bsd": "BSD",
    "bsd-3-clause-clear": "BSD", "apache-2.0": "Apache-2.0", "psf-2.0": "PSF", "python-2.0": "PSF", "isc": "ISC",
}
# Trove classifiers after "License :: OSI Approved :: " (or "License :: ").
_CLASSIFIERS = {
    "MIT License": "MIT", "MIT No Attribution License (MIT-0)": "MIT", "BSD License": "BSD",
    "Apache Software License": "Apache-2.0", "Python Software Foundation License": "PSF", "ISC License (ISCL)": "ISC",
}
# Free-text `License:` values: a short name matched as a whole word; copyleft names are checked first.
_COPYLEFT_WORDS = re.compile(r"\b(L?GPL|AGPL|GNU|MPL|Mozilla|EPL|Eclipse|CDDL|EUPL|SSPL|Commons Clause|"
                             r"Proprietary|Non-Commercial|CC-BY-NC)", re.I)
_NAME_WORDS = [
    (re.compile(r"\bMIT\b|\bExpat\b", re.I), "MIT"),
    (re.compile(r"\bBSD\b|\b0BSD\b|\bNew BSD\b|\bModified BSD\b", re.I), "BSD"),
    (re.compile(r"\bApache\b", re.I), "Apache-2.0"),
    (re.compile(r"\bPSF\b|Python Software Foundation", re.I), "PSF"),
    (re.compile(r"\bISC\b", re.I), "ISC"),
]
# Licence texts, recognised by a phrase each carries (whitespace collapsed, lower case).
_TEXTS = [
    ("permission is hereby granted, free of charge, to any person obtaining a copy", "MIT"),
    ("redistribution and use in source and binary forms, with or without modification, are permitted", "BSD"),
    ("apache license version 2.0", "Apache-2.0"),
    ("licensed under the apache license, version 2.0", "Apache-2.0"),
    ("python software foundation license", "PSF"),
    ("psf license agreement", "PSF"),
    ("permission to use, copy, modify, and/or distribute this software for any purpose with or without fee", "ISC"),
    ("permission to use, copy, modify, and distribute this software for any purpose with or without fee", "ISC"),
]
# Copyleft licence texts, by their titles and grant clauses (not by a mere mention: the PSF licence itself names
# "the GNU General Public License (GPL)" in its CNRI clause, and many permissive files quote it).
_COPYLEFT_TEXTS = re.compile(
    r"gnu (?:lesser |library |affero )?general public license,? (?:version|v\.?) ?\d"
    r"|general public license as published by the free software foundation"
    r"|mozilla public license,? (?:version|v\.) ?\d|subject to the terms of the mozilla public license"
    r"|eclipse public license,? (?:- )?(?:version|v\.?) ?\d|server side public license"
    r"|common development and distribution license")
LICENSE_FILE = re.compile(r"^(?:LICEN[CS]E|COPYING|COPYRIGHT)(?:[._-].*)?$", re.I)
LICENSE_DIRS = ("licenses", "LICENSES", "license", "LICENSE")


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    licenses: tuple[str, ...]   # the permissive families found (sorted)
    reason: str                 # why refused ("" when admitted)


def _collapse(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def spdx_families(expression: str) -> tuple[set[str], list[str]]:
    """(permissive families, other identifiers) of an SPDX expression; AND / OR / WITH / brackets are ignored,
    so an expression is permissive only when every identifier in it is."""
    ids = [t for t in re.split(r"[\s()]+", expression) if t and t.upper() not in ("AND", "OR", "WITH")]
    good, bad = set(), []
    for t in ids:
        family = _SPDX.get(t.lower().removesuffix("+"))
        if family:
            good.add(family)
        else:
            bad.append(t)
    return good, bad


def metadata_verdict(pkg_info: str) -> Verdict:
    """The licence a PKG-INFO (or METADATA) file declares."""
    msg = HeaderParser().parsestr(pkg_info)
    good: set[str] = set()
    expression = (msg.get("License-Expression") or "").strip()
    if expression:
        good, bad = spdx_families(expression)
        if bad:
            return Verdict(False, (), f"metadata License-Expression {expression!r} names {bad}")
    for c in msg.get_all("Classifier") or []:
        if not c.startswith("License ::"):
            continue
        name = c.rsplit("::", 1)[-1].strip()
        if name in _CLASSIFIERS:
            good.add(_CLASSIFIERS[name])
        elif name != "OSI Approved":
            return Verdict(False, (), f"metadata classifier {c!r} is not a permissive licence")
    free = (msg.get("License") or "").strip()
    if free and free.upper() not in ("UNKNOWN", "NONE"):
        first = free if len(free) < 200 else _collapse(free)
        text_family = next((f for phrase, f in _TEXTS if phrase in _collapse(free)), None)
        if text_family:  # the whole licence text pasted into the field
            found = _COPYLEFT_TEXTS.search(_collapse(free))
            if found:
                return Verdict(False, (), f"metadata License text carries {found.group(0)!r}")
            good.add(text_family)
        else:
            if _COPYLEFT_WORDS.search(free[:300]):
                return Verdict(False, (), f"metadata License {first[:80]!r} is not permissive")
            named = {family for pattern, family in _NAME_WORDS if pattern.search(free[:300])}
            if not named:
                return Verdict(False, (), f"metadata License {first[:80]!r} is not a licence we recognise")
            good |= named
    if not good:
        return Verdict(False, (), "metadata declares no licence")
    return Verdict(True, tuple(sorted(good)), "")


def file_verdict(texts: dict[str, str]) -> Verdict:
    """The licence the files {relative path: text} carry; `texts` empty -> refused."""
    if not texts:
        return Verdict(False, (), "no LICENSE / COPYING file")
    found: set[str] = set()
    for path, text in sorted(texts.items()):
        flat = _collapse(text)
        copyleft = _COPYLEFT_TEXTS.search(flat)
        if copyleft:
            return Verdict(False, (), f"licence file {path} carries {copyleft.group(0)!r}")
        found |= {family for phrase, family in _TEXTS if phrase in flat}
    if not found:
        return Verdict(False, (), f"licence files {sorted(texts)} hold no licence text we recognise")
    return Verdict(True, tuple(sorted(found)), "")


def is_license_file(relative: str) -> bool:
    """A licence file at the top of the package, or in a top-level licenses/ folder."""
    parts = relative.split("/")
    if len(parts) == 1:
        return bool(LICENSE_FILE.match(parts[0]))
    return len(parts) == 2 and parts[0] in LICENSE_DIRS


def package_verdict(pkg_info: str, license_texts: dict[str, str]) -> Verdict:
    """Admitted when the metadata and the files are both permissive; the families are the union."""
    meta, files = metadata_verdict(pkg_info), file_verdict(license_texts)
    if not meta.admitted:
        return meta
    if not files.admitted:
        return files
    return Verdict(True, tuple(sorted(set(meta.licenses) | set(files.licenses))), "")
