"""Exceptions of the data pipeline. Every message names the thing at fault (URL, class, shard, member).
Storage failures (after retries) raise the storage layer's `StorageError`, re-exported here."""

from arflow.storage import StorageError


class DataError(RuntimeError):
    """Base class of every data-pipeline error."""


class ManifestError(DataError):
    """The manifest is missing, malformed, of an unknown version, or unusable for what was asked."""


class ShardError(DataError):
    """A shard does not match its manifest entry, or bad samples exceeded the error budget."""


class BadSampleWarning(UserWarning):
    """A sample (tar member) was skipped because it could not be read or decoded."""


__all__ = ["BadSampleWarning", "DataError", "ManifestError", "ShardError", "StorageError"]
