"""ECGs: a synthetic generator with exact wave labels, and readers for ``.npy`` signals, WFDB records and ECG5000.

Signals are channel-first ``(C, L)`` float32 in mV, leads as channels, like every other input of nemt
(``(B, C, L)`` in a batch).

**Synthetic ECGs** (:func:`make_ecgs`, :func:`write_ecg_dataset`): each beat is a sum of Gaussians in time
(McSharry et al. 2003, "A dynamical model for generating synthetic electrocardiogram signals", IEEE TBME
50(3), written directly as a function of time rather than as their ODE): P, Q, R, S and T waves, each
``amplitude * exp(-(t - centre)^2 / (2 width^2))`` around the beat's R peak, plus baseline wander and white
noise. Defaults: 100 Hz, 10 s (1000 samples). Leads come from a dipole model: each wave group (P, QRS, T)
has a direction in the frontal and horizontal planes, and a lead records the projection on its own axis
(limb leads I, II, III, aVR, aVL, aVF in the frontal plane, V1-V6 in the horizontal plane), so one lead is
lead II. This is a caricature of body-surface ECGs, made to have known answers, not a physiological
simulation.

Per-sample wave labels (:data:`WAVES`) are exact by definition: a sample at time t belongs to

- the **P** wave when ``|t - c_P| <= 2 w_P``;
- the **QRS** complex when ``c_Q - 2 w_Q <= t <= c_S + 2 w_S``;
- the **T** wave when ``|t - c_T| <= 2 w_T``;
- the **baseline** otherwise (PR and ST segments, TP interval);

where waves overlap (fast irregular rhythms), QRS wins over T and T over P.

Classes (:data:`ECG_CLASSES`): ``normal`` (sinus rhythm, 55-95 bpm, RR varying by about 3 %);
``inverted_t`` (the T wave's amplitude negated: a negative T peak in lead II); ``wide_qrs`` (Q, R and S
twice as wide and further apart: QRS about 185 ms instead of 100 ms); ``st_elevation`` (a plateau of
0.15-0.3 mV from the J point, the end of the QRS, to the T peak); ``afib`` (absent P waves, irregularly
irregular RR drawn uniformly in 60-140 % of the mean, low fibrillatory waves of 4-8 Hz on the baseline).
:attr:`ECGSet.findings` marks the samples that carry each record's abnormality (inverted T: the T samples;
wide QRS: the QRS samples; ST elevation: the plateau; none for normal and atrial fibrillation, whose
finding has no place of its own).

Randomness: record ``i`` of seed ``s`` is drawn from its own ``numpy.random.default_rng([s, i])``, so a
record does not depend on how many others are drawn, and no global generator is touched.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from nemt.data.readers import Image, _data_range, read_image
from nemt.data.generated import claim_folder
from nemt.errors import DataError
from nemt.files import atomic_open, atomic_path, write_json

ECG_CLASSES = ("normal", "inverted_t", "wide_qrs", "st_elevation", "afib")
"""Class names of the synthetic ECGs, in label order (``afib``: absent P waves and irregular RR)."""
WAVES = ("baseline", "P", "QRS", "T")
"""Per-sample wave labels, in code order (0 = baseline)."""
LEADS12 = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")

# lead axes (degrees) and lengths: limb leads in the frontal plane (0 = the patient's left, 90 = down;
# aVR/aVL/aVF are sqrt(3)/2 long so that II = I + III and aVR = -(I + II) / 2 hold), chest leads in the
# horizontal plane (0 = left lateral, 90 = anterior), 1.5 times as long (chest leads are closer to the heart)
_LIMB = {"I": (0.0, 1.0), "II": (60.0, 1.0), "III": (120.0, 1.0), "aVR": (-150.0, math.sqrt(3) / 2),
         "aVL": (-30.0, math.sqrt(3) / 2), "aVF": (90.0, math.sqrt(3) / 2)}
_CHEST = {"V1": 115.0, "V2": 95.0, "V3": 75.0, "V4": 60.0, "V5": 30.0, "V6": 0.0}
_GROUPS = ("P", "QRS", "T")  # the ST plateau follows the T wave's direction


class Wave(NamedTuple):
    """One Gaussian of a beat: ``amplitude`` (mV, along its group's direction) times
    ``exp(-(t - centre)^2 / (2 width^2))``; ``centre`` and ``width`` in seconds, ``centre`` from the R peak."""

    name: str  # "P", "Q", "R", "S" or "T"
    centre: float
    amplitude: float
    width: float


class Beat(NamedTuple):
    """One beat: its R-peak time ``r`` (s from the record's start), its waves, and an optional ST plateau
    ``st = (start, end, amplitude)`` (s from the R peak, mV) with 8 ms logistic edges."""

    r: float
    waves: tuple[Wave, ...]
    st: tuple[float, float, float] | None = None

    def wave(self, name: str) -> Wave | None:
        return next((w for w in self.waves if w.name == name), None)

    def intervals(self) -> dict[str, tuple[float, float]]:
        """The labelled intervals (absolute seconds, closed) of the module docstring: P, QRS and T (as present)."""
        out = {}
        p, q, s, t = (self.wave(n) for n in ("P", "Q", "S", "T"))
        if p is not None:
            out["P"] = (self.r + p.centre - 2 * p.width, self.r + p.centre + 2 * p.width)
        if q is not None and s is not None:
            out["QRS"] = (self.r + q.centre - 2 * q.width, self.r + s.centre + 2 * s.width)
        if t is not None:
            out["T"] = (self.r + t.centre - 2 * t.width, self.r + t.centre + 2 * t.width)
        return out


def lead_gains(leads: Sequence[str], axes: dict[str, tuple[float, float]] | None = None) -> np.ndarray:
    """(C, 3) projection of the P, QRS and T directions on each lead's axis.

    ``axes``: {group: (frontal angle, horizontal angle)} in degrees; default P (60, 45), QRS (60, -10),
    T (50, 20). Lead II has gain 1 for a wave group whose frontal angle is 60 degrees.
    """
    axes = axes or {"P": (60.0, 45.0), "QRS": (60.0, -10.0), "T": (50.0, 20.0)}
    g = np.zeros((len(leads), len(_GROUPS)))
    for i, lead in enumerate(leads):
        for j, group in enumerate(_GROUPS):
            frontal, horizontal = axes[group]
            if lead in _LIMB:
                angle, length = _LIMB[lead]
                g[i, j] = length * math.cos(math.radians(angle - frontal))
            elif lead in _CHEST:
                g[i, j] = 1.5 * math.cos(math.radians(_CHEST[lead] - horizontal))
            else:
                raise DataError(None, "leads", f"unknown lead {lead!r}; leads are {list(LEADS12)}")
    return g


def render(beats: Sequence[Beat], n_samples: int, fs: float, gains: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free signal (C, L) in mV and wave labels (L,) int8 (codes of :data:`WAVES`) of ``beats``.

    Sample ``n`` is at time ``n / fs``. ``gains`` (C, 3): each lead's gain for the P, QRS and T groups
    (:func:`lead_gains`; ``np.ones((1, 3))`` renders the waves' own amplitudes).
    """
    t = np.arange(int(n_samples)) / float(fs)
    gains = np.asarray(gains, dtype=np.float64)
    group = {"P": 0, "Q": 1, "R": 1, "S": 1, "T": 2}
    # every wave of every beat at once: (W, L) Gaussians summed into their groups
    rows = [(group[w.name], b.r + w.centre, w.amplitude, w.width) for b in beats for w in b.waves]
    curves = np.zeros((len(_GROUPS), t.size))
    if rows:
        g, c, a, w = (np.array(v) for v in zip(*rows))
        each = a[:, None] * np.exp(-((t[None] - c[:, None]) ** 2) / (2 * w[:, None] ** 2))
        for k in range(len(_GROUPS)):
            curves[k] = each[g == k].sum(0)
    for b in beats:
        if b.st is not None:
            start, end, amp = b.st
            edge = 0.008
            rise = 1 / (1 + np.exp(-np.clip((t - b.r - start) / edge, -50, 50)))
            fall = 1 / (1 + np.exp(np.clip((t - b.r - end) / edge, -50, 50)))
            curves[2] += amp * rise * fall
    labels = np.zeros(t.size, dtype=np.int8)
    intervals = [b.intervals() for b in beats]
    for code, name in ((1, "P"), (3, "T"), (2, "QRS")):  # later names win: QRS over T over P
        for iv in (d[name] for d in intervals if name in d):
            labels[(t >= iv[0]) & (t <= iv[1])] = code
    return gains @ curves, labels


@dataclass
class ECGSet:
    """Synthetic ECGs: ``signals`` (N, C, L) float32 mV, ``waves`` (N, L) int8 (:data:`WAVES` codes),
    ``labels`` (N,) int64 (:data:`ECG_CLASSES` indices), ``findings`` (N, L) bool (the samples carrying
    the abnormality), ``fs`` (Hz), ``leads`` (C names), ``beats`` (per record, its :class:`Beat` list)."""

    signals: np.ndarray
    waves: np.ndarray
    labels: np.ndarray
    findings: np.ndarray
    fs: float
    leads: list[str]
    beats: list[list[Beat]] = field(repr=False)
    class_names: tuple[str, ...] = ECG_CLASSES

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def r_peaks(self, i: int) -> np.ndarray:
        """R-peak times of record ``i`` inside the record, in samples (float)."""
        duration = self.signals.shape[-1] / self.fs
        return np.array([b.r * self.fs for b in self.beats[i] if 0 <= b.r < duration])


def _leads(leads: int | Sequence[str]) -> list[str]:
    if isinstance(leads, int) and not isinstance(leads, bool):
        if leads == 1:
            return ["II"]
        if leads == 12:
            return list(LEADS12)
        raise DataError(None, "leads", f"give 1 (lead II), 12, or a list of lead names; got {leads}")
    names = list(leads)
    unknown = [n for n in names if n not in LEADS12]
    if not names or unknown:
        raise DataError(None, "leads", f"unknown leads {unknown or names}; leads are {list(LEADS12)}")
    return names


def synth_record(cls: int, rng: np.random.Generator, *, leads: int | Sequence[str] = 1, fs: float = 100.0,
                 duration: float = 10.0, noise: float = 0.015
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Beat]]:
    """One record of class ``cls`` (index of :data:`ECG_CLASSES`) drawn from ``rng``.

    Returns the signal (C, L) float32 mV (with baseline wander, white noise of ``noise`` mV and, for
    ``afib``, fibrillatory waves), the wave labels (L,) int8, the finding mask (L,) bool, and the beats.
    """
    if not 0 <= int(cls) < len(ECG_CLASSES):
        raise DataError(None, "class", f"class index {cls} is not in 0..{len(ECG_CLASSES) - 1} {ECG_CLASSES}")
    name = ECG_CLASSES[int(cls)]
    names = _leads(leads)
    n = int(round(duration * fs))
    u = rng.uniform
    afib = name == "afib"
    rr_mean = 60.0 / (u(70, 110) if afib else u(55, 95))
    # the record's wave shapes (lead II amplitudes), varied per record
    p = Wave("P", -u(0.16, 0.22), u(0.10, 0.20), u(0.020, 0.030))
    q = Wave("Q", -0.030, -u(0.05, 0.15), 0.010)
    r = Wave("R", 0.0, u(0.8, 1.4), u(0.009, 0.013))
    s = Wave("S", 0.030, -u(0.15, 0.35), 0.010)
    tw = Wave("T", 0.30 * math.sqrt(rr_mean), u(0.20, 0.40), u(0.045, 0.060))  # QT grows with sqrt(RR) (Bazett)
    st = None
    if name == "inverted_t":
        tw = Wave("T", tw.centre, -u(0.15, 0.35), tw.width)
    elif name == "wide_qrs":
        q, r, s = (Wave("Q", -0.050, q.amplitude, 2 * q.width), Wave("R", 0.0, r.amplitude, 2 * r.width),
                   Wave("S", 0.055, s.amplitude, 2 * s.width))
    elif name == "st_elevation":
        st = (s.centre + 2 * s.width, tw.centre, u(0.15, 0.30))
    shapes = ([] if afib else [p]) + [q, r, s, tw]
    axes = {"P": (u(45, 70), 45.0), "QRS": (u(30, 75), u(-20, 10))}
    axes["T"] = (axes["QRS"][0] + u(-15, 15), u(10, 40))
    gains = lead_gains(names, axes)
    # beat times: the first R before the window, then RR intervals (regular, or irregularly irregular)
    beats, t = [], -u(0.0, rr_mean)
    while t < duration + 0.5:
        jitter = 1 + 0.05 * rng.standard_normal(len(shapes))
        beats.append(Beat(t, tuple(Wave(w.name, w.centre, w.amplitude * j, w.width) for w, j in zip(shapes, jitter)),
                          st))
        t += rr_mean * (u(0.6, 1.4) if afib else 1 + 0.03 * rng.standard_normal())
    signal, waves = render(beats, n, fs, gains)
    time = np.arange(n) / fs
    wander = u(0.02, 0.08) * np.sin(2 * np.pi * u(0.1, 0.35) * time + u(0, 2 * np.pi))
    signal = signal + wander * u(0.5, 1.0, size=(len(names), 1))
    if afib:
        f_waves = sum(u(0.01, 0.025) * np.sin(2 * np.pi * u(4, 8) * time + u(0, 2 * np.pi)) for _ in range(2))
        signal = signal + f_waves * gains[:, :1]
    signal = signal + noise * rng.standard_normal(signal.shape)
    findings = np.zeros(n, dtype=bool)
    if name == "inverted_t":
        findings = waves == WAVES.index("T")
    elif name == "wide_qrs":
        findings = waves == WAVES.index("QRS")
    elif name == "st_elevation":
        for b in beats:
            findings |= (time >= b.r + st[0]) & (time <= b.r + st[1])
    return signal.astype(np.float32), waves, findings, beats


#: the shortest record: one whole beat (P wave to T wave's end) at the slowest rate drawn (55/min), whatever
#: the first beat's phase (an R peak falls in every 1.09 s, a beat reaches 0.28 s before and 0.45 s after it)
MIN_DURATION = 2.0
#: the lowest sampling rate: the narrowest wave (R, a QRS of about 0.1 s) still spans 5 samples
MIN_FS = 50.0


def make_ecgs(n: int, *, leads: int | Sequence[str] = 1, fs: float = 100.0, duration: float = 10.0,
              seed: int = 0, classes: Sequence[int] | None = None, noise: float = 0.015) -> ECGSet:
    """``n`` synthetic ECGs (see the module docstring). Record ``i`` has class ``classes[i]`` (default
    ``i mod 5``: balanced) and is drawn from ``numpy.random.default_rng([seed, i])``.

    >>> ecg = make_ecgs(10, leads=12, seed=0)
    >>> ecg.signals.shape, ecg.waves.shape, ecg.labels[:5].tolist()
    ((10, 12, 1000), (10, 1000), [0, 1, 2, 3, 4])
    """
    if n < 1:
        raise DataError(None, "n", f"need at least one record, got {n}")
    if not fs >= MIN_FS:
        raise DataError(None, "fs", f"must be at least {MIN_FS:g} Hz (a QRS complex of 0.1 s spans 5 samples), "
                                    f"got {fs}")
    if not duration >= MIN_DURATION:
        raise DataError(None, "duration", f"must be at least {MIN_DURATION:g} s (one whole beat at 55/min), "
                                          f"got {duration}")
    names = _leads(leads)
    cls = np.arange(n) % len(ECG_CLASSES) if classes is None else np.asarray(classes, dtype=np.int64)
    if cls.shape != (n,):
        raise DataError(None, "classes", f"need {n} class indices, got shape {cls.shape}")
    records = [synth_record(int(c), np.random.default_rng([int(seed), i]), leads=names, fs=fs, duration=duration,
                            noise=noise) for i, c in enumerate(cls)]
    return ECGSet(signals=np.stack([r[0] for r in records]), waves=np.stack([r[1] for r in records]),
                  labels=cls.astype(np.int64), findings=np.stack([r[2] for r in records]), fs=float(fs),
                  leads=names, beats=[r[3] for r in records])


#: the nominal range of the written signals (mV), which ``scale="range"`` maps to [0, 1]
SIGNAL_RANGE = (-3.0, 3.0)


def _save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` atomically (through a file object: ``np.save`` given the temporary file's name, which
    does not end in ``.npy``, would add the suffix)."""
    with atomic_open(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def write_ecg_dataset(out: str | Path, n: int, *, leads: int | Sequence[str] = 1, fs: float = 100.0,
                      duration: float = 10.0, seed: int = 0, overwrite: bool = False) -> Path:
    """Write :func:`make_ecgs` as a data set that ``nemt train`` reads; return its ``manifest.csv``.

    ``signals/ecg_NNNNN.npy`` (C, L) float32 mV, each with a sidecar ``.json`` (``fs``, ``channels``,
    ``units``, ``range`` = :data:`SIGNAL_RANGE`); ``findings/ecg_NNNNN.npy`` (1, L) uint8, the finding mask
    (the manifest's ``mask`` column: the ground truth of localisation metrics, empty for ``normal`` and
    ``afib``); ``waves/ecg_NNNNN.npy`` (1, L) int8 wave labels (an extra ``waves`` column, which the
    manifest ignores). Every file is written atomically (a temporary file, then renamed). Train with
    ``nemt train --data OUT --dims 1 --size L``. The settings go to ``ecg.json``; a folder that holds another
    data set is refused before anything is written (``overwrite``: an ECG set of other settings is replaced,
    its files removed first; see :func:`nemt.data.generated.claim_folder`).
    """
    out = Path(out)
    ecg = make_ecgs(n, leads=leads, fs=fs, duration=duration, seed=seed)
    settings = {"generator": "nemt.data.ecg", "n": n, "leads": list(ecg.leads), "fs": float(fs),
                "duration": float(duration), "seed": seed}
    claim_folder(out, "ecg.json", settings, command="nemt data ecg", overwrite=overwrite)
    for sub in ("signals", "findings", "waves"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    side = {"fs": float(fs), "channels": list(ecg.leads), "units": "mV", "range": list(SIGNAL_RANGE)}
    for i in range(n):
        stem = f"ecg_{i:05d}"
        _save_npy(out / "signals" / f"{stem}.npy", ecg.signals[i])
        with atomic_path(out / "signals" / f"{stem}.json") as tmp:
            tmp.write_text(json.dumps(side), encoding="utf-8")
        _save_npy(out / "findings" / f"{stem}.npy", ecg.findings[i][None].astype(np.uint8))
        _save_npy(out / "waves" / f"{stem}.npy", ecg.waves[i][None])
        rows.append((f"signals/{stem}.npy", f"findings/{stem}.npy", f"waves/{stem}.npy",
                     ECG_CLASSES[int(ecg.labels[i])]))
    path = out / "manifest.csv"
    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "mask", "waves", "label"])
        w.writerows(rows)
    write_json(out / "ecg.json", settings)
    return path


# ---------------------------------------------------------------------------- readers

def read_signal(path: str | Path, fs: float | None = None) -> Image:
    """One ECG (or any 1D signal) as an :class:`~nemt.data.readers.Image` with ``array`` (C, L) float32.

    A ``.npy`` array ((L,) or (C, L)), whose sampling rate is ``fs`` or its sidecar's ``fs`` (see
    :func:`nemt.data.readers.read_image`), or a WFDB record (a ``.hea`` header, or the record's path
    without suffix: :func:`read_wfdb`). ``meta["fs"]`` holds the sampling rate and ``spacing`` is
    ``(1 / fs,)`` seconds; ``fs`` given here overrides the file's.
    """
    path = Path(path)
    if path.suffix.lower() == ".hea" or (not path.exists() and path.with_suffix(".hea").is_file()):
        img = read_wfdb(path)
    else:
        img = read_image(path)
        if img.array.ndim != 2:
            raise DataError(path, "shape", f"a signal is (L,) or (C, L); the array is {img.meta.get('shape')}")
    if fs is not None:
        if not (isinstance(fs, (int, float)) and math.isfinite(fs) and fs > 0):
            raise DataError(path, "fs", f"sampling rate must be a positive number, got {fs!r}")
        img.meta["fs"], img.spacing = float(fs), (1.0 / float(fs),)
    if "fs" not in img.meta:
        raise DataError(path, "fs", "sampling rate unknown: pass fs=, or write {\"fs\": <samples per second>} into "
                        f"{path.with_suffix('.json')}")
    return img


def _wfdb_number(header: Path, field_name: str, text: str, kind=float):
    try:
        v = kind(text)
    except ValueError:
        raise DataError(header, field_name, f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise DataError(header, field_name, f"{text!r} is not finite")
    return v


def read_wfdb(path: str | Path) -> Image:
    """A WFDB record (PhysioNet's format: a ``.hea`` text header and a binary ``.dat``) in physical units.

    Supported: single-segment records whose signals share one data file in format 16 (little-endian
    int16) or 212 (two 12-bit samples in three bytes), the formats of PTB-XL and the MIT-BIH databases.
    Physical value = (digital - baseline) / gain (gain default 200 per unit, baseline default the ADC
    zero). Returns (C, L) float32 with ``meta``: ``fs``, ``channels`` (the signals' descriptions),
    ``units``. Anything else is refused naming the header, the field and the reason.
    """
    path = Path(path)
    header = path if path.suffix.lower() == ".hea" else path.with_suffix(".hea")
    if not header.is_file():
        raise DataError(header, "file", "WFDB header not found")
    try:
        lines = [ln.strip() for ln in header.read_text(encoding="latin-1").splitlines()]
    except OSError as exc:
        raise DataError(header, "file", str(exc)) from exc
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise DataError(header, "record line", "empty header")
    rec = lines[0].split()
    if len(rec) < 2 or "/" in rec[0]:
        raise DataError(header, "record line", f"{lines[0]!r}: expected 'name nsig [fs [nsamp]]' of a single-segment "
                        "record (multi-segment records are not supported)")
    nsig = int(_wfdb_number(header, "nsig", rec[1], int))
    fs = _wfdb_number(header, "fs", rec[2].split("/")[0].split("(")[0]) if len(rec) > 2 else 250.0
    nsamp = int(_wfdb_number(header, "nsamp", rec[3], int)) if len(rec) > 3 else None
    if nsig < 1 or fs <= 0:
        raise DataError(header, "record line", f"need nsig >= 1 and fs > 0, got nsig={nsig}, fs={fs}")
    if len(lines) < 1 + nsig:
        raise DataError(header, "signal lines", f"the record line says {nsig} signals, the header has "
                        f"{len(lines) - 1} signal lines")
    files, formats, gains, baselines, units, names = set(), set(), [], [], [], []
    for k, ln in enumerate(lines[1:1 + nsig]):
        parts = ln.split(maxsplit=8)
        if len(parts) < 2:
            raise DataError(header, f"signal {k}", f"{ln!r}: expected 'file format [gain ...]'")
        files.add(parts[0])
        fmt = parts[1].split("x")[0].split(":")[0].split("+")[0]
        if "x" in parts[1] or ":" in parts[1] or "+" in parts[1]:
            raise DataError(header, f"signal {k} format", f"{parts[1]!r}: sample multiplicity, skew and byte "
                            "offsets are not supported")
        formats.add(fmt)
        gain, base, unit = 200.0, None, "mV"
        if len(parts) > 2:
            g = parts[2]
            if "/" in g:
                g, unit = g.split("/", 1)
            if "(" in g:
                g, b = g.split("(", 1)
                base = _wfdb_number(header, f"signal {k} baseline", b.rstrip(")"))
            gain = _wfdb_number(header, f"signal {k} gain", g) or 200.0  # a gain of 0 means "uncalibrated": 200
        adczero = _wfdb_number(header, f"signal {k} adczero", parts[4]) if len(parts) > 4 else 0.0
        gains.append(gain)
        baselines.append(adczero if base is None else base)
        units.append(unit)
        names.append(parts[8] if len(parts) > 8 else f"signal{k}")
    if len(files) != 1 or len(formats) != 1:
        raise DataError(header, "signal lines", f"signals in files {sorted(files)} with formats {sorted(formats)}; "
                        "supported: all signals in one file, one format")
    fmt, dat = formats.pop(), header.parent / files.pop()
    if fmt not in ("16", "212"):
        raise DataError(header, "format", f"format {fmt} is not supported (supported: 16, 212)")
    if not dat.is_file():
        raise DataError(dat, "file", f"data file named by {header.name} not found")
    raw = np.fromfile(dat, dtype=np.uint8)
    if fmt == "16":
        if raw.size % 2:
            raise DataError(dat, "size", f"{raw.size} bytes is not a whole number of 16-bit samples")
        digital = raw.view("<i2").astype(np.int64)
    else:
        if raw.size % 3 == 2:  # an odd sample count: the last byte pair holds one sample
            raw = np.concatenate([raw, np.zeros(1, np.uint8)])
        b = raw[: raw.size - raw.size % 3].reshape(-1, 3).astype(np.int64)
        pair = np.stack([b[:, 0] | ((b[:, 1] & 0x0F) << 8), b[:, 2] | ((b[:, 1] & 0xF0) << 4)], axis=1).ravel()
        digital = np.where(pair >= 2048, pair - 4096, pair)
    total = digital.size // nsig
    n = total if nsamp is None or nsamp == 0 else nsamp
    if n > total:
        raise DataError(dat, "size", f"the header says {n} samples per signal, the file holds {total}")
    frames = digital[: n * nsig].reshape(n, nsig).T
    array = ((frames - np.asarray(baselines)[:, None]) / np.asarray(gains)[:, None]).astype(np.float32)
    meta = {"fs": float(fs), "channels": names, "units": units, "format": fmt}
    return Image(array, (1.0 / float(fs),), None, _data_range(array), "wfdb", str(header), meta)


ECG5000_CLASSES = {1: "normal", 2: "r_on_t_pvc", 3: "pvc", 4: "sv_ectopic", 5: "unclassified"}
"""The classes of UCR ECG5000 (file codes 1-5): normal, R-on-T premature ventricular contraction,
premature ventricular contraction, supraventricular premature or ectopic beat, unclassified beat."""


def read_ecg5000(path: str | Path, classes: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """UCR ECG5000 text (one beat a line: the class 1-5, then 140 samples) as beats (N, 1, 140) float32 and
    classes (N,) int64 (the file's codes 1-5).

    ``classes``: keep only beats of these codes (e.g. ``(1, 2)``: normal and R-on-T PVC), in file order.
    Every line must have a whole class in 1..5 and the same number of finite samples as the first;
    otherwise a :class:`~nemt.errors.DataError` names the file, the line and the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file", "ECG5000 file not found")
    beats, codes, width = [], [], None
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            try:
                values = np.array([float(v) for v in parts])
            except ValueError as exc:
                raise DataError(path, f"line {i}", f"not a number ({exc})") from None
            code = values[0]
            if code != round(code) or not 1 <= code <= 5:
                raise DataError(path, f"line {i}", f"class {parts[0]!r} is not one of 1-5 {ECG5000_CLASSES}")
            width = width or len(values) - 1
            if len(values) - 1 != width or width < 2:
                raise DataError(path, f"line {i}", f"{len(values) - 1} samples, expected {width} (as line 1)")
            if not np.isfinite(values[1:]).all():
                raise DataError(path, f"line {i}", "NaN or infinite sample")
            codes.append(int(code))
            beats.append(values[1:])
    if not beats:
        raise DataError(path, "file", "no beats in the file")
    x, y = np.stack(beats).astype(np.float32)[:, None], np.asarray(codes, dtype=np.int64)
    if classes is not None:
        keep = np.isin(y, np.asarray(list(classes)))
        x, y = x[keep], y[keep]
    return x, y


def stratified_split(labels: Sequence[int], fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0
                     ) -> dict[str, np.ndarray]:
    """Seeded stratified train/val/test indices of an array-held data set (sorted index arrays).

    Each class's indices are shuffled with ``numpy.random.default_rng(seed)`` and dealt in proportion to
    ``fractions`` (rounded; the remainder goes to train), so every split has each class's share. Manifests
    use :func:`nemt.data.splits.split_indices`, which also keeps patients whole.
    """
    y = np.asarray(labels)
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or (f < 0).any() or not np.isclose(f.sum(), 1.0):
        raise DataError(None, "fractions", f"need three non-negative fractions summing to 1, got {list(fractions)}")
    rng = np.random.default_rng(int(seed))
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val, n_test = int(round(f[1] * idx.size)), int(round(f[2] * idx.size))
        parts["val"].append(idx[:n_val])
        parts["test"].append(idx[n_val:n_val + n_test])
        parts["train"].append(idx[n_val + n_test:])
    return {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in parts.items()}
