"""HashAudit: robustness audits for deep-hashing image retrieval."""

__version__ = "0.1.0"
