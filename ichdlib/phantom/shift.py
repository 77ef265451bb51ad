"""Scanner shifts: the phantom drawn as another scanner would reconstruct and store it.

A :class:`ScannerShift` changes only what a different CT scanner / protocol changes, never the anatomy or the
hemorrhage model: slice spacing (= thickness, contiguous slabs, so partial volume follows), field of view
(head size in pixels, hence PixelSpacing), noise level and texture, reconstruction kernel (softer blur or
edge enhancement), a calibration drift of the HU scale (``hu' = hu_scale * hu + hu_offset``), the display
windows written in the headers and the pixel encodings. ``none`` is the ordinary phantom (byte-identical to
one drawn without a shift). ``ichd synth --shift scannerB`` / ``synth.shift: scannerB``.

The named profiles stay within what real head-CT protocols do: 2.5-8 mm axial slices, 200-260 mm fields of
view, soft to moderately sharp soft-tissue kernels, water/tissue calibration drifts of a few HU (QC tolerance
for water is +-4 HU; tissue values move more with kVp and beam hardening).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ScannerShift:
    """Scanner/protocol settings of a phantom; the defaults are the ordinary phantom's."""

    name: str = "none"
    description: str = "the ordinary phantom"
    #: Slice spacing (= slab thickness) range in mm, and the range of the number of slices.
    spacing_z: tuple[float, float] = (4.0, 6.0)
    slices: tuple[int, int] = (24, 40)
    #: Field of view relative to the ordinary phantom's (> 1: the head is smaller in pixels).
    fov_scale: float = 1.0
    #: Noise standard deviation relative to the ordinary phantom's, and its correlation (Gaussian sigma in
    #: pixels; texture: larger is blotchier; it applies below 0.8 mm pixels as in the ordinary phantom).
    noise_scale: float = 1.0
    noise_sigma_px: float = 0.7
    #: Reconstruction kernel: in-plane blur relative to the ordinary phantom's, then edge enhancement
    #: (unsharp mask ``img + sharpen * (img - gauss(img, sharpen_mm))``; 0 = off).
    blur_scale: float = 1.0
    sharpen: float = 0.0
    sharpen_mm: float = 1.2
    #: Calibration drift: stored HU = ``hu_scale * hu + hu_offset``.
    hu_offset: float = 0.0
    hu_scale: float = 1.0
    #: Header windows (center, width) drawn per study, and pixel encodings drawn per study.
    windows: tuple[tuple[float, float], ...] = ((40, 80), (40, 80), (40, 150), (35, 80), (30, 80), (40, 100))
    encodings: tuple[str, ...] = ("signed", "signed", "unsigned", "unsigned12")

    @property
    def is_default(self) -> bool:
        return self == ScannerShift()

    @property
    def noise_kernel(self) -> int:
        """Odd Gaussian kernel size for the noise texture (5 for the ordinary 0.7 px)."""
        return 2 * int(math.ceil(3 * self.noise_sigma_px - 0.5)) + 1

    def summary(self) -> dict:
        """The settings as a JSON-ready dict (for the manifest)."""
        out = asdict(self)
        out["windows"] = [list(w) for w in self.windows]
        out["encodings"] = list(self.encodings)
        return out


#: The named profiles. ``scannerB`` and ``scannerC`` shift in opposite directions; a recipe tuned while
#: looking at one of them is honestly checked on the other.
SHIFTS: dict[str, ScannerShift] = {
    "none": ScannerShift(),
    "scannerB": ScannerShift(
        name="scannerB",
        description="thin 2.5-3 mm slices, wide 1.3x field of view (smaller head), a sharper kernel with "
                    "edge enhancement and 2.5x finer-grained noise, HU drift +5 HU / x1.03, other header "
                    "windows, unsigned 16-bit storage",
        spacing_z=(2.5, 3.0), slices=(40, 64), fov_scale=1.3, noise_scale=2.5, noise_sigma_px=0.5,
        blur_scale=0.6, sharpen=0.6, sharpen_mm=1.2, hu_offset=5.0, hu_scale=1.03,
        windows=((40, 120), (35, 100), (50, 130)), encodings=("unsigned",),
    ),
    "scannerC": ScannerShift(
        name="scannerC",
        description="thick 6-8 mm slices, tight 0.92x field of view (larger head), a soft kernel (2x blur) "
                    "with blotchy low noise (0.6x, 1.5 px texture), HU drift -4 HU / x0.97, other header "
                    "windows, 12-bit storage",
        spacing_z=(6.0, 8.0), slices=(16, 28), fov_scale=0.92, noise_scale=0.6, noise_sigma_px=1.5,
        blur_scale=2.0, hu_offset=-4.0, hu_scale=0.97,
        windows=((40, 80), (30, 60)), encodings=("unsigned12",),
    ),
}


def get_shift(name: str | ScannerShift | None) -> ScannerShift:
    """The profile called ``name`` (None or ``none``: the ordinary phantom); a bad name raises one line."""
    if isinstance(name, ScannerShift):
        return name
    if name is None:
        return SHIFTS["none"]
    if name not in SHIFTS:
        raise ValueError(f"unknown scanner shift {name!r}; choose one of {', '.join(SHIFTS)}")
    return SHIFTS[name]


__all__ = ["ScannerShift", "SHIFTS", "get_shift"]
