"""Data: the dataset registry, offline lookup, and in-memory device-resident batching."""

from msnet.data.memory import DataBundle, batches, load_raw, num_batches, prepare_data
from msnet.data.sources import DATASETS, RawData

__all__ = ["DATASETS", "DataBundle", "RawData", "batches", "load_raw", "num_batches", "prepare_data"]
