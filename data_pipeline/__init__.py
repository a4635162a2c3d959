"""Data pipeline of stylegan_dist: prepare / synthetic datasets as Parquet shards, and stream them.

Modules: ``prepare`` (images -> shards), ``synthetic`` (known-factor dataset -> shards), ``stream``
(LocalBatchSource / RayBatchSource / iter_images / read_labels), ``bench`` (throughput), ``format``
(manifest and encodings). See data_pipeline/README.md.
"""

from .format import DatasetError, open_manifest

__all__ = ["DatasetError", "open_manifest"]
