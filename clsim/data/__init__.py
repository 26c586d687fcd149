"""Datasets: one in-memory :class:`Dataset` per name, loaded from the data root."""

from clsim.data.dataset import Dataset
from clsim.data.registry import dataset_names, load_dataset, resolve_data_root

__all__ = ["Dataset", "dataset_names", "load_dataset", "resolve_data_root"]
