"""Fill-in-the-middle prompts, as pure functions of a tokenizer and strings; the layout is the tokenizer's
family's (families.py).

Code Llama (Meta's codellama `llama/generation.py`, `infilling_prompt_tokens`) trained two layouts:

    PSM (prefix-suffix-middle):  "<PRE> {prefix} <SUF>{suffix} <MID>"
        [BOS, <PRE>] + encode(prefix) + [<SUF>] + encode_infilling(suffix) + [<MID>]
    SPM (suffix-prefix-middle):  "<PRE> <SUF>{suffix} <MID> {prefix}"
        [BOS, <PRE>, <SUF>] + encode_infilling(suffix) + [<MID>] + encode(prefix)

The space written before {prefix} is SentencePiece's implicit leading space, which `encode` adds; the
suffix follows its marker with no space, so it goes through `encode_infilling`. In SPM the model continues
straight after the prefix, which is what makes it suit an editor cursor mid-token. Generation stops at <EOT>.

The byte-level families have the same PSM shape with their own markers and no implicit space:

    Qwen2.5-Coder:   <|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>      (no BOS)
    DeepSeek-Coder:  <｜begin▁of▁sentence｜><｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>

Neither was trained suffix-first, so for them `spm=True` (the language server's default, chosen for Code
Llama) gives PSM: the order a family was not trained with would only cost quality. Qwen2.5-Coder also
takes repository-level context before the FIM part (`repository_prompt_tokens`).
"""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import Tokenizer, TokenizerError  # SentencePiece itself is imported only when one is opened


def infilling_prompt_tokens(tok: Tokenizer, prefix: str, suffix: str, spm: bool = False) -> list[int]:
    """Token ids of an infilling prompt; the model's output after them is the middle, ended by a stop id."""
    head = [tok.bos_id] if tok.family.fim_bos else []
    if spm and tok.family.spm:
        return (head + [tok.prefix_id, tok.suffix_id] + tok.encode_infilling(suffix) + [tok.middle_id]
                + tok.encode(prefix))
    return (head + [tok.prefix_id] + tok.encode(prefix) + [tok.suffix_id] + tok.encode_infilling(suffix)
            + [tok.middle_id])


def repository_prompt_tokens(tok: Tokenizer, repo_name: str, files: Sequence[tuple[str, str]], path: str,
                             prefix: str, suffix: str) -> list[int]:
    """Qwen2.5-Coder's repository-level FIM prompt (its README and technical report):

        <|repo_name|>{repo_name}\\n<|file_sep|>{path 1}\\n{content 1}\\n ... <|file_sep|>{path}\\n
        <|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>

    `files`: (path, content) of the other files, in the order given. TokenizerError for a family without
    repository tokens."""
    f = tok.family
    if f.repo_name is None or f.file_sep is None:
        raise TokenizerError(f"the {f.name} family has no repository-level format (no repo_name/file_sep tokens)")
    repo, sep = tok.special_id(f.repo_name), tok.special_id(f.file_sep)
    ids = [repo] + tok.encode(f"{repo_name}\n")
    for file_path, content in files:
        ids += [sep] + tok.encode(f"{file_path}\n{content}\n")
    return ids + [sep] + tok.encode(f"{path}\n") + infilling_prompt_tokens(tok, prefix, suffix)


def cut_middle(tok: Tokenizer, generated: Sequence[int]) -> tuple[list[int], bool]:
    """The generated ids before the first stop id (<EOT>, EOS, or a family's other end tokens), and whether
    such a stop was found (False: the middle was cut short by a length limit)."""
    stops = set(tok.stop_ids)
    for n, i in enumerate(generated):
        if i in stops:
            return list(generated[:n]), True
    return list(generated), False


def decode_middle(tok: Tokenizer, generated: Sequence[int]) -> str:
    """Text of the middle: ids up to the first stop, decoded without dropping a leading space, since
    the middle continues the prefix (" return" after "x =" keeps its space)."""
    ids, _ = cut_middle(tok, generated)
    return tok.decode_infilling(ids)
