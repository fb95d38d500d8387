"""Synthetic modulated radio signals for automatic modulation recognition (S01, "ClST: A Convolutional
Transformer Framework for Automatic Modulation Recognition by Knowledge Distillation", Hou et al., IEEE TWC
2024). Frames are complex baseband I/Q, shaped `(2, length)` (row 0 in-phase, row 1 quadrature), 128 samples
at 8 samples per symbol like RadioML 2016.10A; nothing is downloaded, everything is made here from a seed.

Classes (`MODULATIONS`): BPSK, QPSK, 8PSK, 16QAM, 64QAM, PAM4 (linear, root-raised-cosine shaped, symbols of
unit average power) and GFSK, CPFSK (binary, continuous phase, modulation index 0.5; GFSK's frequency pulse
Gaussian-filtered with bandwidth-time product 0.3, CPFSK's rectangular).

Channel, drawn per frame: a timing offset (a whole number of samples, 0..sps-1, from where the frame starts in
the shaped stream), a carrier frequency offset (uniform in +-`max_cfo` cycles per sample), a carrier phase
offset (uniform in [0, 2 pi)) and white complex Gaussian noise at the frame's SNR: the noise variance is the
frame's measured signal power over 10^(SNR/10). Each frame is then scaled to unit average power
(`normalise`), so the networks never read the SNR off the amplitude.

Splits: train, validation and test are drawn independently (from `seed` and the split's index), with the same
number of frames of every class at every SNR of the sweep (-20..18 dB step 2 by default). Every split keeps
each frame's SNR (`SignalDataset.snr`) for per-SNR accuracy. `holdout: validation` evaluates on the
validation split (choosing hyperparameters) and leaves the test split unread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import TensorDataset

from distill.data.base import DATASETS, DataSplits
from distill.errors import UserError

MODULATIONS = ("BPSK", "QPSK", "8PSK", "16QAM", "64QAM", "PAM4", "GFSK", "CPFSK")
LINEAR = ("BPSK", "QPSK", "8PSK", "16QAM", "64QAM", "PAM4")
SNRS_DB = tuple(range(-20, 20, 2))  # -20, -18, ..., 18: RadioML 2016.10A's sweep
SPLITS = ("train", "validation", "test")
HOLDOUTS = ("test", "validation")
FSK_INDEX = 0.5  # modulation index h of GFSK and CPFSK
GFSK_BT = 0.3  # bandwidth-time product of GFSK's Gaussian filter


class SignalDataset(TensorDataset):
    """(frame, label) pairs like any `TensorDataset`, plus each frame's SNR in dB (`snr`)."""

    def __init__(self, frames: torch.Tensor, labels: torch.Tensor, snr: torch.Tensor) -> None:
        super().__init__(frames.contiguous(), labels.long().contiguous())
        self.snr = snr.contiguous()


def rrc_taps(rolloff: float, sps: int, span: int) -> np.ndarray:
    """Root-raised-cosine filter, `span` symbols at `sps` samples per symbol, unit energy (squares sum to 1).

    h(t) = [sin(pi t (1 - b)) + 4 b t cos(pi t (1 + b))] / [pi t (1 - (4 b t)^2)], t in symbol periods,
    with the limits h(0) = 1 - b + 4 b / pi and h(+-1 / (4 b)) = b / sqrt(2) [(1 + 2/pi) sin(pi / (4 b))
    + (1 - 2/pi) cos(pi / (4 b))]. The filter convolved with itself is a raised cosine: zero at every
    nonzero multiple of the symbol period (no inter-symbol interference after a matched filter)."""
    if not 0.0 < rolloff <= 1.0:
        raise UserError(f"signals data: rolloff must lie in (0, 1], got {rolloff}")
    half = span * sps // 2  # taps -half..half: symmetric (linear phase) for any span and sps
    t = np.arange(-half, half + 1, dtype=np.float64) / sps
    b = rolloff
    taps = np.empty_like(t)
    at_zero = np.isclose(t, 0.0)
    at_pole = np.isclose(np.abs(4 * b * t), 1.0)
    rest = ~(at_zero | at_pole)
    tr = t[rest]
    taps[rest] = (np.sin(np.pi * tr * (1 - b)) + 4 * b * tr * np.cos(np.pi * tr * (1 + b))) / (
        np.pi * tr * (1 - (4 * b * tr) ** 2)
    )
    taps[at_zero] = 1 - b + 4 * b / np.pi
    taps[at_pole] = (b / math.sqrt(2)) * (
        (1 + 2 / np.pi) * math.sin(np.pi / (4 * b)) + (1 - 2 / np.pi) * math.cos(np.pi / (4 * b))
    )
    return taps / np.sqrt(np.sum(taps**2))


def constellation(name: str) -> np.ndarray:
    """The symbol alphabet of a linear modulation, scaled to unit average power over equiprobable symbols."""
    if name == "BPSK":
        points = np.array([1.0, -1.0], dtype=np.complex128)
    elif name in ("QPSK", "8PSK"):
        order = 4 if name == "QPSK" else 8
        points = np.exp(1j * (2 * np.pi * np.arange(order) / order + (np.pi / 4 if order == 4 else 0.0)))
    elif name in ("16QAM", "64QAM"):
        side = 4 if name == "16QAM" else 8
        levels = np.arange(-(side - 1), side, 2, dtype=np.float64)
        points = (levels[:, None] + 1j * levels[None, :]).ravel()
    elif name == "PAM4":
        points = np.array([-3.0, -1.0, 1.0, 3.0], dtype=np.complex128)
    else:
        raise UserError(f"signals data: '{name}' is not a linear modulation ({', '.join(LINEAR)})")
    return points / np.sqrt(np.mean(np.abs(points) ** 2))


def gaussian_pulse(bt: float, sps: int, span: int = 4) -> np.ndarray:
    """GFSK's Gaussian frequency filter (bandwidth-time product `bt`), unit DC gain (taps sum to 1)."""
    half = span * sps // 2  # taps -half..half: symmetric (linear phase) for any span and sps
    t = np.arange(-half, half + 1, dtype=np.float64) / sps
    sigma = math.sqrt(math.log(2)) / (2 * math.pi * bt)  # in symbol periods
    taps = np.exp(-(t**2) / (2 * sigma**2))
    return taps / taps.sum()


def linear_baseband(
    name: str, n_samples: int, sps: int, rrc: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Random symbols of `name`, upsampled and RRC-shaped; the filter's transient is dropped."""
    points = constellation(name)
    delay = len(rrc) // 2
    n_symbols = math.ceil((n_samples + 2 * delay) / sps) + 1
    symbols = points[rng.integers(0, len(points), n_symbols)]
    upsampled = np.zeros(n_symbols * sps, dtype=np.complex128)
    upsampled[::sps] = symbols
    shaped = np.convolve(upsampled, rrc)  # full convolution: transients at both ends
    # Unit symbol energy spread over sps samples: scale so that the average sample power is about 1.
    return shaped[2 * delay : 2 * delay + n_samples] * math.sqrt(sps)


def fsk_baseband(name: str, n_samples: int, sps: int, rng: np.random.Generator) -> np.ndarray:
    """Binary continuous-phase FSK: phase(t) = pi h sum of the frequency pulse / sps; constant envelope."""
    n_symbols = math.ceil(n_samples / sps) + 8
    bits = rng.integers(0, 2, n_symbols) * 2.0 - 1.0
    frequency = np.repeat(bits, sps)
    if name == "GFSK":
        frequency = np.convolve(frequency, gaussian_pulse(GFSK_BT, sps), mode="same")
    elif name != "CPFSK":
        raise UserError(f"signals data: '{name}' is not a frequency-shift modulation (GFSK, CPFSK)")
    phase = np.cumsum(np.pi * FSK_INDEX * frequency / sps) + rng.uniform(0, 2 * np.pi)
    start = 4 * sps  # skip the Gaussian filter's edge
    return np.exp(1j * phase[start : start + n_samples])


@dataclass(frozen=True)
class ChannelSettings:
    length: int = 128
    sps: int = 8
    rolloff: float = 0.35
    span: int = 8
    max_cfo: float = 0.002  # cycles per sample
    normalise: bool = True


def clean_frame(
    modulation: str, settings: ChannelSettings, rng: np.random.Generator, rrc: np.ndarray
) -> np.ndarray:
    """`length` complex samples of `modulation` after the timing, frequency and phase offsets, no noise."""
    n = settings.length
    offset = int(rng.integers(0, settings.sps))  # timing: where the frame starts within a symbol
    if modulation in LINEAR:
        clean = linear_baseband(modulation, n + offset, settings.sps, rrc, rng)[offset:]
    else:
        clean = fsk_baseband(modulation, n + offset, settings.sps, rng)[offset:]
    cfo = rng.uniform(-settings.max_cfo, settings.max_cfo)
    phase = rng.uniform(0, 2 * np.pi)
    return clean * np.exp(1j * (2 * np.pi * cfo * np.arange(n) + phase))


def add_noise(clean: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """`clean` plus white circular Gaussian noise of variance P / 10^(SNR/10), P the frame's measured
    power."""
    signal_power = float(np.mean(np.abs(clean) ** 2))
    noise_power = signal_power / 10 ** (snr_db / 10)
    noise = rng.normal(0.0, math.sqrt(noise_power / 2), (2, len(clean)))
    return clean + noise[0] + 1j * noise[1]


def make_frame(
    modulation: str, snr_db: float, settings: ChannelSettings, rng: np.random.Generator, rrc: np.ndarray
) -> np.ndarray:
    """One (2, length) float32 frame of `modulation` through the channel at `snr_db`."""
    received = add_noise(clean_frame(modulation, settings, rng, rrc), snr_db, rng)
    if settings.normalise:
        received = received / math.sqrt(float(np.mean(np.abs(received) ** 2)))
    return np.stack([received.real, received.imag]).astype(np.float32)


def accuracy_by_snr(predictions: torch.Tensor, labels: torch.Tensor, snr: torch.Tensor) -> dict[float, float]:
    """Accuracy of `predictions` (class indices) among the frames of each SNR, by SNR in dB, ascending."""
    correct = (predictions == labels).float()
    return {float(level): float(correct[snr == level].mean()) for level in torch.unique(snr).tolist()}


@lru_cache(maxsize=8)  # a benchmark builds the same splits for several runs in one process; read-only after
def make_split(
    per_class_per_snr: int,
    seed: int,
    settings: ChannelSettings,
    modulations: tuple[str, ...] = MODULATIONS,
    snrs: tuple[int, ...] = SNRS_DB,
) -> SignalDataset:
    """`per_class_per_snr` frames of every modulation at every SNR, in a seeded shuffled order."""
    rng = np.random.default_rng(seed)
    rrc = rrc_taps(settings.rolloff, settings.sps, settings.span)
    frames, labels, levels = [], [], []
    for label, modulation in enumerate(modulations):
        for snr in snrs:
            for _ in range(per_class_per_snr):
                frames.append(make_frame(modulation, snr, settings, rng, rrc))
                labels.append(label)
                levels.append(snr)
    order = rng.permutation(len(labels))
    return SignalDataset(
        torch.from_numpy(np.stack(frames)[order]),
        torch.tensor(labels)[order],
        torch.tensor(levels, dtype=torch.float32)[order],
    )


def _positive(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"signals data: {name} must be a positive whole number, got {value!r}")
    return value


@DATASETS.register(
    "signals",
    summary="synthetic modulated I/Q frames (8 modulations, SNR -20..18 dB), 2 x 128",
    paper="ClST (Hou et al., IEEE TWC 2024), RadioML 2016.10A-like",
)
def signals(
    *,
    train_per_class_per_snr: int = 48,
    val_per_class_per_snr: int = 16,
    test_per_class_per_snr: int = 32,
    holdout: str = "test",
    seed: int = 0,
    length: int = 128,
    sps: int = 8,
    rolloff: float = 0.35,
    max_cfo: float = 0.002,
    snr_min: int = -20,
    snr_max: int = 18,
    snr_step: int = 2,
    normalise: bool = True,
) -> DataSplits:
    """Train / validation / test splits of synthetic modulated frames, each drawn from its own seed."""
    counts = {
        "train": _positive("train_per_class_per_snr", train_per_class_per_snr),
        "validation": _positive("val_per_class_per_snr", val_per_class_per_snr),
        "test": _positive("test_per_class_per_snr", test_per_class_per_snr),
    }
    if holdout not in HOLDOUTS:
        raise UserError(f"signals data: holdout must be one of {', '.join(HOLDOUTS)}, got {holdout!r}")
    _positive("length", length)
    _positive("sps", sps)
    _positive("snr_step", snr_step)
    if snr_max < snr_min:
        raise UserError(f"signals data: snr_max {snr_max} is below snr_min {snr_min}")
    if not 0.0 <= max_cfo < 0.5:
        raise UserError(f"signals data: max_cfo must lie in [0, 0.5) cycles per sample, got {max_cfo}")
    settings = ChannelSettings(length, sps, rolloff, 8, max_cfo, normalise)
    snrs = tuple(range(snr_min, snr_max + 1, snr_step))
    # Only the splits read are drawn; each from its own seed, so the train split is the same whatever holdout.
    train = make_split(counts["train"], seed * len(SPLITS) + 1, settings, snrs=snrs)
    held_out = make_split(
        counts[holdout], seed * len(SPLITS) + 1 + SPLITS.index(holdout), settings, snrs=snrs
    )
    description = (
        f"synthetic signals (seed {seed}): {len(MODULATIONS)} modulations x {len(snrs)} SNRs "
        f"({snrs[0]}..{snrs[-1]} dB), {len(train)} train / {len(held_out)} {holdout} frames of "
        f"(2, {length}) I/Q, {sps} samples per symbol"
    )
    return DataSplits(train, held_out, len(MODULATIONS), (2, length), description=description)
