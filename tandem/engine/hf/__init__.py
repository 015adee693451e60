"""The built-in engine: PyTorch + transformers with continuous batching and a paged KV cache."""
