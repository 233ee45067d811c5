"""Data: readers, manifests, splits, preprocessing, data sets, phantoms, checks.

The data path reads: ``read_image`` -> ``open_dataset`` (a Manifest) ->
``split_indices`` -> ``Preprocessing`` -> ``ImageDataset``.
"""
from nemt.data.manifest import Manifest, Sample, TASKS, open_dataset, load_manifest, load_folder, load_medmnist_npz
from nemt.data.splits import split_indices
from nemt.data.preprocess import Preprocessing
from nemt.data.dataset import ImageDataset, channel_stats
from nemt.data.readers import Image, read_image, read_mask, read_medmnist
from nemt.data.phantoms import FINDINGS, PhantomSet, make_phantoms, write_phantom_dataset

__all__ = [
    "FINDINGS", "PhantomSet", "make_phantoms", "write_phantom_dataset",
    "Image", "ImageDataset", "Manifest", "Preprocessing", "Sample", "TASKS", "channel_stats",
    "load_folder", "load_manifest", "load_medmnist_npz", "open_dataset", "read_image", "read_mask",
    "read_medmnist", "split_indices",
]
