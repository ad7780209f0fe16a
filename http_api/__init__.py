"""HTTP completion APIs (llama.cpp's /infill, OpenAI's /v1/completions) in front of the same workers as the LSP."""
