"""codefill: self-hosted Code Llama fill-in-the-middle completion. The CLI and benchmarks live here."""
