"""Exceptions of the data pipeline. Every message names the thing at fault (URL, class, shard, member)."""


class DataError(RuntimeError):
    """Base class of every data-pipeline error."""


class ManifestError(DataError):
    """The manifest is missing, malformed, of an unknown version, or unusable for what was asked."""


class StorageError(DataError):
    """Storage could not be reached or refused access (after bounded retries for transient failures)."""


class ShardError(DataError):
    """A shard does not match its manifest entry, or bad samples exceeded the error budget."""


class BadSampleWarning(UserWarning):
    """A sample (tar member) was skipped because it could not be read or decoded."""
