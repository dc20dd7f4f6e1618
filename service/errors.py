"""Domain exceptions shared by the training package, the store and the service.

Each carries an optional ``field`` so that the API layer can report which input was bad.
They are also *permanent*: an audit chunk that raises one fails its audit at once with the
message (``service.jobs.tasks.run_chunk``), while any other exception is taken for a fault of
the machine and retried. So input-caused failures (a corrupt or oversized uploaded image, a
bad spec) must surface as one of these, never as a library's own exception.
"""

from __future__ import annotations


class HashAuditError(Exception):
    """Base class for all errors this package raises on purpose."""

    code = "hashaudit_error"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class DataNotFound(HashAuditError):
    """A data set file or folder is missing; the message says how to get it."""

    code = "data_not_found"


class CorruptData(HashAuditError):
    """A data file exists but cannot be parsed (bad magic, truncated, bad label line)."""

    code = "corrupt_data"


class UnknownName(HashAuditError):
    """A registry lookup failed; the message lists the known names."""

    code = "unknown_name"


class InvalidName(UnknownName):
    """A name that could never be valid (path characters, ``..``); refused before any lookup."""

    code = "invalid_name"


class BundleError(HashAuditError):
    """A model bundle is missing, incomplete, tampered with or of another version."""

    code = "bundle_error"


class ChecksumMismatch(BundleError):
    """A bundle file's sha256 differs from the one its manifest records."""

    code = "checksum_mismatch"


class ConfigError(HashAuditError):
    """A training or service configuration value is invalid."""

    code = "config_error"


class AttackInputError(HashAuditError):
    """An attack was asked for with what it cannot use (labels, target, eps, options)."""

    code = "bad_attack_input"


class BadInput(HashAuditError):
    """A request value is invalid (the API answers 422 naming ``field``)."""

    code = "bad_input"


class BadImage(BadInput):
    """An upload is empty or claims to be an image but cannot be decoded."""

    code = "bad_image"


class UnsupportedImageType(BadInput):
    """An upload is not a PNG or JPEG by its content (the API answers 415)."""

    code = "unsupported_media_type"


class PayloadTooLarge(BadInput):
    """An upload exceeds the byte limit or an image the pixel limit (the API answers 413)."""

    code = "payload_too_large"


class Forbidden(HashAuditError):
    """The request is valid but this server does not allow it (the API answers 403)."""

    code = "forbidden"


class Busy(HashAuditError):
    """The inference queue is full or models are still loading (the API answers 503)."""

    code = "busy"

    def __init__(self, message: str, field: str | None = None, retry_after: int = 1) -> None:
        super().__init__(message, field)
        self.retry_after = retry_after
