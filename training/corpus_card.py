"""The corpus's data card: corpus.json (every number) and CORPUS.md (the same for people), beside the shards.

It lists every package with its version, pinned SHA-256, licences, files, characters and tokens, and what
was skipped by which rule; the held-out packages; the refused ones with the reason; the files dropped as
HumanEval text; every shard; the shards that fit the GPU machine's carry limit; and the measurement behind
carrying text rather than token shards (the same sample carried both ways, xz-compressed).
"""

from __future__ import annotations

import hashlib
import json
import lzma
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .corpus_shards import MIB, read_shard

SAMPLE_CHARS = 4_000_000   # text measured every way for the transport decision
# The FIM rows measured: the standard-library recipe's [fim] (recipes/codefill-stdlib.toml) in rows of 1,025 tokens.
SAMPLE_FIM = dict(fim_rate=0.9, spm_rate=0.5, seed=0, line_rate=0.8, line_lines=3, window_tokens=512, pack=True)
SAMPLE_ROW_LENGTH = 1025


def _transport(out: Path, first_shard: str, tokenizer: Path | None, preset: int) -> dict:
    """Compressed bytes per character of the same sample carried three ways, all xz: as text; as the token
    ids of its plain encoding; and as the FIM rows training reads (corpus_rows.py's row files). Text and rows
    are the two forms a trainer can start from; `carry` names the smaller."""
    docs, chars = [], 0
    for d in read_shard(out / first_shard):
        docs.append((f"{d.package}/{d.path}", d.text))
        chars += len(d.text)
        if chars >= SAMPLE_CHARS:
            break
    text_bytes = len(lzma.compress("".join(t for _, t in docs).encode("utf-8"), preset=preset))
    result = {"sample_chars": chars, "text_xz_bytes": text_bytes, "text_bytes_per_char": text_bytes / chars,
              "carry": "text"}
    if tokenizer is None:
        return result
    from codefill.model.tokenizer import Tokenizer

    from .corpus_rows import fim_rows_parallel
    from .fim_examples import FimConfig

    tok = Tokenizer(tokenizer)
    if tok.vocab_size > 65536 or not tok.has_infilling:
        return result
    ids = np.concatenate([np.asarray(tok.encode(t), np.uint16) for _, t in docs])
    token_bytes = len(lzma.compress(ids.tobytes(), preset=preset))
    rows = fim_rows_parallel(docs, tokenizer, FimConfig(**SAMPLE_FIM), SAMPLE_ROW_LENGTH, workers=1)
    row_bytes = (len(lzma.compress(rows.ids.tobytes(), preset=preset))
                 + len(lzma.compress(np.packbits(rows.scored, axis=1).tobytes(), preset=preset)))
    result.update(tokens=int(len(ids)), token_xz_bytes=token_bytes, token_bytes_per_char=token_bytes / chars,
                  fim_row_xz_bytes=row_bytes, fim_row_bytes_per_char=row_bytes / chars,
                  carry="text" if text_bytes <= row_bytes else "rows")
    return result


def _carry(shards: dict, limit_mib: float) -> dict:
    """Every held-out shard, then train shards in order while the total stays within the limit."""
    held = shards["held_out"]
    total = sum(s.bytes for s in held)
    train = []
    for s in shards["train"]:
        if total + s.bytes > limit_mib * MIB:
            break
        train.append(s)
        total += s.bytes
    return {"limit_mib": limit_mib, "bytes": total, "train_shards": [s.name for s in train],
            "held_out_shards": [s.name for s in held], "train_chars": sum(s.chars for s in train),
            "train_files": sum(s.files for s in train)}


def write_card(out: Path, config, reports: list, shards: dict, contaminated: dict[str, str],
               tokenizer: Path | None, seconds: float) -> dict:
    from .corpus import STDLIB_NAME

    admitted = [r for r in reports if r.split != "refused"]
    skipped = Counter()
    for r in admitted:
        skipped.update(r.skipped)
    total = lambda split, key: sum(getattr(r, key) for r in admitted if r.split == split)
    card = {
        "format": "codefill-corpus", "version": 1, "name": config.name,
        "config": json.loads(json.dumps(asdict(config), default=str)),
        "tokenizer": None if tokenizer is None else {
            "path": str(tokenizer), "sha256": hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest()},
        "totals": {
            "packages_admitted": len(admitted), "packages_refused": len(reports) - len(admitted),
            "train_files": total("train", "files"), "train_chars": total("train", "chars"),
            "train_tokens": total("train", "tokens"),
            "held_out_files": total("held_out", "files"), "held_out_chars": total("held_out", "chars"),
            "held_out_tokens": total("held_out", "tokens"),
            "skipped": dict(sorted(skipped.items())),
            "train_shard_bytes": sum(s.bytes for s in shards["train"]),
            "held_out_shard_bytes": sum(s.bytes for s in shards["held_out"]),
        },
        "held_out": [r.name for r in admitted if r.split == "held_out"],
        "refused": [{"name": r.name, "version": r.version, "reason": r.refused} for r in reports
                    if r.split == "refused"],
        "humaneval_files": dict(sorted(contaminated.items())),
        "packages": [{**asdict(r), "licenses": list(r.licenses), "skipped": dict(sorted(r.skipped.items()))}
                     for r in reports],
        "shards": {k: [asdict(s) for s in v] for k, v in shards.items()},
        "carry": _carry(shards, config.carry_mib),
        "transport": _transport(out, shards["train"][0].name, tokenizer, config.xz_preset),
        "stdlib": STDLIB_NAME if config.stdlib else None,
        "build_seconds": seconds,
    }
    (out / "corpus.json").write_text(json.dumps(card, indent=1) + "\n")
    (out / "CORPUS.md").write_text(_markdown(card))
    return card


def _markdown(card: dict) -> str:
    t, c, tr = card["totals"], card["carry"], card["transport"]
    lines = [f"# Corpus {card['name']}", "",
             "Built by `codefill data corpus` (training/corpus.py, which states every rule). Licences admitted: MIT, "
             "BSD, Apache-2.0, PSF, ISC, in both the package metadata and its licence files.", "",
             f"- training: {t['train_files']:,} files, {t['train_chars']:,} characters, {t['train_tokens']:,} tokens "
             f"in {len(card['shards']['train'])} shards ({t['train_shard_bytes'] / MIB:.1f} MiB xz)",
             f"- held out (whole packages, for evaluation only): {', '.join(card['held_out']) or 'none'}: "
             f"{t['held_out_files']:,} files, {t['held_out_chars']:,} characters, {t['held_out_tokens']:,} tokens",
             f"- packages: {t['packages_admitted']} admitted, {t['packages_refused']} refused",
             "- files skipped: " + (", ".join(f"{k} {v:,}" for k, v in t["skipped"].items()) or "none"),
             f"- dropped as HumanEval text: {len(card['humaneval_files'])} files",
             f"- tokens counted with: {card['tokenizer']['path'] if card['tokenizer'] else 'not counted'}", "",
             "## What travels to the GPU machine", "",
             f"Within {c['limit_mib']} MiB: every held-out shard and the first {len(c['train_shards'])} training "
             f"shards, {c['bytes'] / MIB:.1f} MiB holding {c['train_chars']:,} characters of training code "
             f"({c['train_files']:,} files). Shards are a hash-ordered mix, so any prefix is a fair sample.", "",
             f"Text or tokens: a sample of {tr['sample_chars']:,} characters is {tr['text_xz_bytes']:,} bytes as "
             f"xz text ({tr['text_bytes_per_char']:.3f} bytes a character)"]
    if "token_xz_bytes" in tr:
        ratio = tr["fim_row_xz_bytes"] / tr["text_xz_bytes"]
        lines[-1] += (f"; {tr['token_xz_bytes']:,} bytes as xz uint16 ids of its plain encoding "
                      f"({tr['token_bytes_per_char']:.3f}); and {tr['fim_row_xz_bytes']:,} bytes as the FIM rows "
                      f"training reads ({tr['fim_row_bytes_per_char']:.3f}, the bundled recipe's [fim]). Rows cost "
                      f"{ratio:.2f} times the text's bytes, so the corpus travels as "
                      + ("text, tokenized on the GPU machine (its FIM cuts, passes and tokenizer stay free); row "
                         "files (`codefill recipe --prepare`) are for a machine without SentencePiece."
                         if tr["carry"] == "text" else
                         "row files (`codefill recipe --prepare`), built here."))
    else:
        lines[-1] += "; tokens were not measured (no tokenizer given)."
    lines += ["", "## Packages", "", "| package | version | split | licences | metadata licence | files | characters "
              "| tokens | skipped |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in card["packages"]:
        if p["split"] == "refused":
            continue
        skipped = ", ".join(f"{k} {v}" for k, v in p["skipped"].items())
        lines.append(f"| {p['name']} | {p['version']} | {p['split']} | {', '.join(p['licenses'])} | "
                     f"{p['metadata_license'].replace('|', '/')} | {p['files']:,} | {p['chars']:,} | {p['tokens']:,} "
                     f"| {skipped} |")
    lines += ["", "## Refused", "", "| package | version | reason |", "| --- | --- | --- |"]
    lines += [f"| {r['name']} | {r['version']} | {r['reason'].replace('|', '/')} |" for r in card["refused"]]
    if card["humaneval_files"]:
        lines += ["", "## Dropped as HumanEval text", ""]
        lines += [f"- `{path}`: {task}" for path, task in card["humaneval_files"].items()]
    lines += ["", "## Shards", "", "| shard | files | characters | xz bytes |", "| --- | --- | --- | --- |"]
    for part in ("train", "held_out"):
        lines += [f"| {s['name']} | {s['files']:,} | {s['chars']:,} | {s['bytes']:,} |" for s in card["shards"][part]]
    return "\n".join(lines) + "\n"
