"""The Llama / Code Llama architecture in MindSpore: config, tokenizer and FIM prompts, weights on disk, generation."""
