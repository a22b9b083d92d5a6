"""Ollama's HTTP API on a listener of its own (--ollama-port, 11434 by default)."""
