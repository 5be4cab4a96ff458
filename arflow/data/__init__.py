"""Class-bucketed WebDataset shards on local disk or object storage, streamed into same-class sequences.

    from arflow.data import load_manifest, Manifest, SequenceLoader

Shared by both sides: ``manifest`` (the shard set's description), ``shards`` (tar format, reading,
writing), ``errors``; storage access (fsspec, bounded retries) is
:mod:`arflow.storage`'s.
Streaming side: ``plan`` (what an epoch holds and who emits it), ``sequences`` (one stream: shards ->
sequences), ``loader`` (SequenceLoader: batches, resume).
Writer side: the ``arflow.data.writing`` subpackage (image reading, sources, encoders, build; see
tools/make_shards.py).
"""

from arflow.data.errors import BadSampleWarning, DataError, ManifestError, ShardError, StorageError
from arflow.data.loader import SequenceLoader
from arflow.data.manifest import Manifest, ShardInfo, load_manifest
from arflow.storage import RetryPolicy

__all__ = [
    "BadSampleWarning",
    "DataError",
    "Manifest",
    "ManifestError",
    "RetryPolicy",
    "SequenceLoader",
    "ShardError",
    "ShardInfo",
    "StorageError",
    "load_manifest",
]
