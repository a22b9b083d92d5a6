"""tokenwire: serve a local LLM token by token."""

__version__ = "0.1.0"
