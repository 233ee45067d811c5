"""Data: readers, manifests, splits, preprocessing, data sets, phantoms, checks.

The data path reads: ``read_image`` -> ``open_dataset`` (a Manifest) ->
``split_indices`` -> ``Preprocessing`` -> ``ImageDataset``. 1D signals (ECGs, ``(C, L)``) travel the same
path as ``.npy`` files; ``nemt.data.ecg`` makes synthetic ECGs and reads WFDB records and ECG5000.
"""
from nemt.data.manifest import Manifest, Sample, TASKS, open_dataset, load_manifest, load_folder, load_medmnist_npz
from nemt.data.splits import split_indices
from nemt.data.preprocess import Preprocessing
from nemt.data.dataset import ImageDataset, channel_stats
from nemt.data.readers import Image, read_image, read_mask, read_medmnist
from nemt.data.phantoms import FINDINGS, PhantomSet, make_phantoms, write_phantom_dataset
from nemt.data.ecg import (ECG_CLASSES, ECGSet, make_ecgs, read_ecg5000, read_signal, read_wfdb, stratified_split,
                           write_ecg_dataset)

__all__ = [
    "FINDINGS", "PhantomSet", "make_phantoms", "write_phantom_dataset",
    "ECG_CLASSES", "ECGSet", "make_ecgs", "read_ecg5000", "read_signal", "read_wfdb", "stratified_split",
    "write_ecg_dataset",
    "Image", "ImageDataset", "Manifest", "Preprocessing", "Sample", "TASKS", "channel_stats",
    "load_folder", "load_manifest", "load_medmnist_npz", "open_dataset", "read_image", "read_mask",
    "read_medmnist", "split_indices",
]
