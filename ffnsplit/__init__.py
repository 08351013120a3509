"""ffnsplit: split transformer FFNs into heavy-hitter neurons kept dense and light neurons compressed hard."""

__version__ = "0.1.0"
FORMAT_VERSION = 1
