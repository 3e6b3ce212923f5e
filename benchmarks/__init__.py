"""Measurements of qwen_magic; method and latest figures in benchmarks/README.md."""
