"""Decoder LLMs: loading (Hugging Face folder or GGUF), export with a KV cache, generation, LLM parity."""
