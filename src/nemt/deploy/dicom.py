"""Explanations as DICOM, for a PACS or any DICOM viewer: a Secondary Capture image beside its source.

``nemt explain --dicom`` writes, for each 2D DICOM input and explained label, an RGB Secondary Capture
(``1.2.840.10008.5.1.4.1.1.7``) of the map over the image, **at the source's own rows, columns and pixel
spacing**, in the source's study (its patient and study modules copied) and in a new series per model,
method and label, with the source named in its ``SourceImageSequence``. It is a picture for review, not a
measurement: ``ImageType`` DERIVED\\SECONDARY, ``BurnedInAnnotation`` NO, and ``ImageComments`` and
``DerivationDescription`` say which model, method and label made it and that it is not for diagnosis.
The raw map stays in the ``.npy`` written beside it.

UIDs are derived from their inputs (pydicom's ``generate_uid`` with entropy sources: the source's SOP
instance UID, the model's weights checksum, the method, its parameters and the label), so running the same
explanation again gives the same series and instance UIDs: a PACS replaces the object instead of adding a
copy.

Written with pydicom rather than highdicom: highdicom's ``SCImage`` requires the patient orientation for a
patient-based image, which many radiographs lack (the SIIM sample here has none), and inventing one would
mislabel the image; without orientation the copied modules are the ones listed in :data:`_COPIED`.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import numpy as np

#: the source's attributes copied as they are (patient, study, and the geometry a viewer aligns with)
_COPIED = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
           "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
           "StudyDescription", "PixelSpacing", "ImagerPixelSpacing", "PatientOrientation", "Laterality",
           "ImageLaterality", "BodyPartExamined", "ViewPosition")
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
#: the series number of an explanation series (above a scanner's usual numbers, so it sorts after them)
SERIES_NUMBER = 9000


def secondary_capture(source, rgb: np.ndarray, *, model_sha256: str, method: str, label: str,
                      settings: str = "", series_offset: int = 0) -> "object":
    """A pydicom ``FileDataset``: ``rgb`` ((rows, columns, 3) uint8, the overlay at the source's size) as a
    Secondary Capture in ``source``'s study (a pydicom ``Dataset`` read from the input; its pixels are not
    needed). ``settings``: the method's parameters as text, part of the UIDs' entropy and of the comments;
    ``series_offset``: added to the series number (one series per label)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    from nemt import __version__

    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"rgb must be (rows, columns, 3) uint8, got shape {rgb.shape}")
    src_uid = str(source.get("SOPInstanceUID", ""))
    keys = [src_uid, model_sha256, method, settings, label]
    series_uid = generate_uid(entropy_srcs=["series", str(source.get("SeriesInstanceUID", "")), *keys[1:]])
    sop_uid = generate_uid(entropy_srcs=["instance", *keys])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    for key in _COPIED:  # the elements as stored (a non-conforming value, e.g. an age "62", is kept, not fixed)
        if key in source and source[key].value not in (None, ""):
            ds[key] = copy.deepcopy(source[key])
    if "StudyInstanceUID" not in ds:  # a source without a study: a study of its own, derived like the rest
        ds.StudyInstanceUID = generate_uid(entropy_srcs=["study", src_uid])
    ds.SOPClassUID, ds.SOPInstanceUID = SECONDARY_CAPTURE, sop_uid
    ds.Modality = "OT"
    ds.ConversionType = "WSD"  # workstation
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = SERIES_NUMBER + int(series_offset)
    ds.SeriesDescription = f"nemt {method}: {label}"[:64]
    ds.InstanceNumber = int(source.get("InstanceNumber", 1) or 1)
    ds.Manufacturer = "nemt"
    ds.SoftwareVersions = __version__
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "NO"
    words = (f"Explanation map of {label} by {method}{' (' + settings + ')' if settings else ''}, model weights "
             f"sha256 {model_sha256[:16]}; not for diagnostic use")
    ds.DerivationDescription = words[:1024]
    ds.ImageComments = words[:10240]
    if src_uid:
        ref = Dataset()
        ref.ReferencedSOPClassUID = source.get("SOPClassUID", "")
        ref.ReferencedSOPInstanceUID = src_uid
        ds.SourceImageSequence = DicomSequence([ref])
    ds.Rows, ds.Columns = int(rgb.shape[0]), int(rgb.shape[1])
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rgb.tobytes()
    return ds


def overlay_at_source(unit: np.ndarray, heat: np.ndarray, alpha: float = 0.45, cmap: str = "inferno") -> np.ndarray:
    """The map ``heat`` (model size, [0, 1]) resized to the image ``unit`` ((C, rows, columns) in [0, 1], the
    source's own size) bilinearly, with the model's centre convention, and blended over it as the service's
    overlay: (rows, columns, 3) uint8."""
    import torch
    import torch.nn.functional as F

    from nemt.visualize import colormap_lut, overlay

    size = tuple(unit.shape[1:])
    t = torch.as_tensor(np.asarray(heat, dtype=np.float32))[None, None]
    up = F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].clamp(0, 1).numpy()
    return overlay(unit, up, alpha, colormap_lut(cmap))


def dicom_problem(img, spatial_dims: int) -> str | None:
    """Why ``--dicom`` cannot write a Secondary Capture for a read image (an :class:`~nemt.data.readers.Image`),
    or None: only 2D single-frame DICOM inputs of a 2D model have a study and a geometry to place it in."""
    if img.modality != "dicom":
        return f"not a DICOM file ({img.modality}): a Secondary Capture belongs in its source's DICOM study"
    if spatial_dims != 2 or img.array.ndim != 3:
        return "a multi-frame DICOM or a volume: --dicom writes 2D Secondary Captures only"
    return None


def source_header(path: str | Path):
    """The DICOM header of an input (no pixels), for :func:`secondary_capture`."""
    import pydicom
    return pydicom.dcmread(str(path), stop_before_pixels=True, force=True)


__all__: Sequence[str] = ("secondary_capture", "overlay_at_source", "dicom_problem", "source_header")
