"""Model families: which tokenizer and which fill-in-the-middle tokens a checkpoint was trained with.

The architecture (config.py) says how to compute; the family says how to talk to the weights: the tokenizer
file a MODEL_DIR carries, the FIM marker tokens, whether a FIM prompt starts with BOS, whether the
suffix-first (SPM) order was trained, the tokens that end a middle, and the repository-level context tokens.
A MODEL_DIR records its family in its architecture (`LlamaConfig.family`), so the language server, the HTTP
server, the workers' stop-rule table and training all pick the same ones; nothing is guessed from paths.

Published formats (golden-tested in tests/test_families.py):

- Code Llama (meta-llama/codellama `generation.py`): "<PRE> {prefix} <SUF>{suffix} <MID>" after BOS, PSM and
  SPM, ends with <EOT>; SentencePiece `tokenizer.model` (model/tokenizer.py).
- Qwen2.5-Coder (its README): "<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>", no BOS, PSM only;
  the base model ends a middle with <|endoftext|>; repository-level prompts put
  "<|repo_name|>{name}\n<|file_sep|>{path}\n{content}\n" ... before the FIM part; byte-level BPE
  `tokenizer.json` (model/bpe_tokenizer.py).
- DeepSeek-Coder (its README): "<｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>" after BOS
  <｜begin▁of▁sentence｜>, PSM only, ends with <｜end▁of▁sentence｜>; byte-level BPE `tokenizer.json`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    hf_model_type: str  # the Hugging Face `model_type` of its checkpoints
    tokenizer_file: str  # "tokenizer.model" (SentencePiece) or "tokenizer.json" (byte-level BPE)
    prefix: str  # FIM marker tokens, in PSM order
    suffix: str
    middle: str
    eot: str  # what the model emits after a middle
    bos: str  # the id `bos_id` names (Qwen has no BOS; its document separator <|endoftext|> stands in)
    eos: str
    fim_bos: bool  # a FIM prompt starts with BOS
    spm: bool  # trained with the suffix-prefix-middle order too; without it every prompt is PSM
    stops: tuple[str, ...] = ()  # more tokens that end a middle (beside eot and eos)
    repo_name: str | None = None  # repository-level context tokens, where the family was trained with them
    file_sep: str | None = None


FAMILIES: dict[str, Family] = {
    # First per model type: the family a checkpoint of that type is unless its tokenizer says otherwise.
    "codellama": Family("codellama", "llama", "tokenizer.model", "▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>",
                        "<s>", "</s>", fim_bos=True, spm=True),
    "deepseek-coder": Family("deepseek-coder", "llama", "tokenizer.json", "<｜fim▁begin｜>", "<｜fim▁hole｜>",
                             "<｜fim▁end｜>", "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>",
                             "<｜end▁of▁sentence｜>", fim_bos=True, spm=False, stops=("<|EOT|>",)),
    # <|fim_pad|>, <|file_sep|> and <|repo_name|> also end a middle: the model has left the hole (llama.cpp
    # stops on them too).
    "qwen2.5-coder": Family("qwen2.5-coder", "qwen2", "tokenizer.json", "<|fim_prefix|>", "<|fim_suffix|>",
                            "<|fim_middle|>", "<|endoftext|>", "<|endoftext|>", "<|endoftext|>", fim_bos=False,
                            spm=False, stops=("<|fim_pad|>", "<|file_sep|>", "<|repo_name|>"),
                            repo_name="<|repo_name|>", file_sep="<|file_sep|>"),
}
