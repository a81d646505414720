"""PNG output of the tools: labelled figures (panels of image grids, each with a title, a caption, row
labels and column labels, stacked into one picture with Pillow; ``python -m ddim_fast demo``) and single
images written atomically (``save_png``; ``python -m ddim_fast generate``).

Images come in as float tensors [N, C, H, W] in [-1, 1] (C = 1 or 3) and are upscaled with nearest
neighbour so that small samples stay readable.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass, field

import torch

# Layout constants in pixels.
_MARGIN = 16
_GAP = 4
_TITLE_SIZE = 18
_TEXT_SIZE = 13
_INK = (20, 20, 20)
_GREY = (95, 95, 95)


# Timing noise: a ratio of two timings within this band of 1 is worded "the same". DEFAULT_NOISE (+-3%) when
# the spread of either side was not measured; else the larger measured spread (relative_spread), but never
# below NOISE_FLOOR: 1.01x is the same on any machine (ratios are printed with two decimals, and runs of one
# process to the next differ by more than 1% even on an idle GPU).
DEFAULT_NOISE = 0.03
NOISE_FLOOR = 0.015


def relative_spread(values) -> float | None:
    """How far a typical run lies from the median of repeated timings: half the interquartile range over
    the median. None with fewer than 3 finite positive values (no spread measured)."""
    import statistics

    vals = sorted(float(v) for v in values if v == v and v > 0)
    if len(vals) < 3:
        return None
    q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    return (q3 - q1) / 2 / statistics.median(vals)


def noise_band(*spreads: float | None) -> float:
    """The relative difference under which two timings count as the same: the larger of the sides' measured
    spreads (:func:`relative_spread`, or pytest-benchmark's IQR / 2 / median), at least NOISE_FLOOR; when a
    side's spread is unknown (None / NaN), at least DEFAULT_NOISE."""
    known = [float(s) for s in spreads if s is not None and s == s]
    floor = NOISE_FLOOR if spreads and len(known) == len(spreads) else DEFAULT_NOISE
    return max([floor, *known])


def speed_phrase(baseline: float, candidate: float, *, noise: float = DEFAULT_NOISE) -> str:
    """'2.10x faster', '1.25x slower' or 'the same (...)' for the candidate's time against the baseline's."""
    if not (baseline > 0 and candidate > 0):
        return "not comparable"
    return ratio_phrase(baseline / candidate, noise=noise)


def is_within_noise(speedup: float, noise: float = DEFAULT_NOISE) -> bool:
    """True when a speed-up (baseline time / candidate time) as printed (two decimals) lies within ``noise``
    of 1 either way."""
    shown = round(speedup if speedup >= 1 else 1 / speedup, 2)
    return shown - 1 <= noise + 1e-9


def ratio_phrase(speedup: float, width: int = 0, *, noise: float = DEFAULT_NOISE) -> str:
    """A speed-up (baseline time / candidate time) said the right way round: '2.10x faster', '1.25x slower'
    (never '0.80x faster'), and 'the same (1.01x faster, inside the ±3% noise)' when it lies within ``noise``
    (:func:`noise_band`) of 1; '-' when there is none. The tools, the benchmarks and benchmarks/report.py all
    word their ratios with this."""
    if not speedup > 0:
        return "-"
    plain = f"{speedup:{width}.2f}x faster" if speedup >= 1 else f"{1 / speedup:{width}.2f}x slower"
    if is_within_noise(speedup, noise):
        shown = plain.strip() if round(speedup, 2) != 1 else "1.00x"
        percent = f"{100 * noise:.0f}" if noise >= 0.1 else f"{100 * noise:.1f}".rstrip("0").rstrip(".")
        return f"the same ({shown}, inside the ±{percent}% noise)"
    return plain


def compare_phrase(speedup: float, other: str, width: int = 0, *, noise: float = DEFAULT_NOISE) -> str:
    """:func:`ratio_phrase` against a named entry: '2.00x faster than X', 'the same as X (1.01x faster, ...)'."""
    phrase = ratio_phrase(speedup, width, noise=noise)
    if phrase.startswith("the same ("):
        return f"the same as {other} {phrase[len('the same '):]}"
    return phrase if phrase == "-" else f"{phrase} than {other}"


def require_pillow():
    """Pillow's Image, ImageDraw and ImageFont, or a clear error naming the extra that installs it."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError as exc:
        raise RuntimeError("the labelled figures need Pillow: pip install 'ddim-fast[demo]' (or pip install pillow)"
                           ) from exc
    return Image, ImageDraw, ImageFont


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats [N, C, H, W] -> uint8 [N, H, W, 3] (grey images are repeated to RGB)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W], got shape {tuple(images.shape)}")
    pixels = ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if pixels.shape[1] == 1:
        pixels = pixels.repeat(1, 3, 1, 1)
    return pixels.permute(0, 2, 3, 1).contiguous()


@dataclass
class Panel:
    """One titled grid: ``images`` [rows * cols, C, H, W] in row-major order."""

    title: str
    images: torch.Tensor
    cols: int
    caption: str = ""
    row_labels: list[str] = field(default_factory=list)
    col_labels: list[str] = field(default_factory=list)

    def __post_init__(self):
        n = self.images.shape[0]
        if self.cols < 1 or n % self.cols:
            raise ValueError(f"Panel {self.title!r}: {n} images do not fill rows of {self.cols}")
        rows = n // self.cols
        if self.row_labels and len(self.row_labels) != rows:
            raise ValueError(f"Panel {self.title!r}: {len(self.row_labels)} row labels for {rows} rows")
        if self.col_labels and len(self.col_labels) != self.cols:
            raise ValueError(f"Panel {self.title!r}: {len(self.col_labels)} column labels for {self.cols} columns")

    @property
    def rows(self) -> int:
        return self.images.shape[0] // self.cols


def _fonts(ImageFont):
    try:
        return ImageFont.load_default(size=_TITLE_SIZE), ImageFont.load_default(size=_TEXT_SIZE)
    except TypeError:  # Pillow < 10.1: one fixed bitmap font
        font = ImageFont.load_default()
        return font, font


def _text_size(draw, text: str, font) -> tuple[int, int]:
    if not text:
        return 0, 0
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def compose(panels: list[Panel], *, title: str, subtitle: str = "", cell: int = 64):
    """One PIL image: the figure title and subtitle, then each panel (title, caption, labelled grid).
    Every image is scaled (nearest neighbour) to ``cell`` pixels on its longer side."""
    Image, ImageDraw, ImageFont = require_pillow()
    title_font, text_font = _fonts(ImageFont)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = _text_size(probe, "Ag", text_font)[1] + 4
    title_line = _text_size(probe, "Ag", title_font)[1] + 6

    # Panel geometry first, so the canvas is exactly as large as it needs to be.
    layouts = []
    width = 2 * _MARGIN + max(_text_size(probe, title, title_font)[0], _text_size(probe, subtitle, text_font)[0])
    height = _MARGIN + title_line + (line if subtitle else 0) + _MARGIN
    for panel in panels:
        label_w = max((_text_size(probe, s, text_font)[0] for s in panel.row_labels), default=0)
        label_w = label_w + 8 if label_w else 0
        col_w = max([cell] + [_text_size(probe, s, text_font)[0] + 4 for s in panel.col_labels])
        grid_w = label_w + panel.cols * (col_w + _GAP)
        text_w = max(_text_size(probe, panel.title, title_font)[0], _text_size(probe, panel.caption, text_font)[0])
        panel_h = title_line + (line if panel.caption else 0) + panel.rows * (cell + _GAP) + (
            line if panel.col_labels else 0)
        layouts.append((label_w, col_w, panel_h))
        width = max(width, 2 * _MARGIN + grid_w, 2 * _MARGIN + text_w)
        height += panel_h + _MARGIN

    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = _MARGIN
    draw.text((_MARGIN, y), title, fill=_INK, font=title_font)
    y += title_line
    if subtitle:
        draw.text((_MARGIN, y), subtitle, fill=_GREY, font=text_font)
        y += line
    y += _MARGIN // 2
    for panel, (label_w, col_w, panel_h) in zip(panels, layouts):
        draw.line([(_MARGIN, y - _MARGIN // 2), (width - _MARGIN, y - _MARGIN // 2)], fill=(215, 215, 215))
        draw.text((_MARGIN, y), panel.title, fill=_INK, font=title_font)
        y += title_line
        if panel.caption:
            draw.text((_MARGIN, y), panel.caption, fill=_GREY, font=text_font)
            y += line
        pixels = to_uint8(panel.images)
        h, w = pixels.shape[1:3]
        scale = max(1, cell // max(h, w))
        for r in range(panel.rows):
            top = y + r * (cell + _GAP)
            if panel.row_labels:
                tw, th = _text_size(draw, panel.row_labels[r], text_font)
                draw.text((_MARGIN + label_w - 8 - tw, top + (cell - th) // 2), panel.row_labels[r], fill=_INK,
                          font=text_font)
            for c in range(panel.cols):
                tile = Image.fromarray(pixels[r * panel.cols + c].numpy()).resize((w * scale, h * scale),
                                                                                Image.NEAREST)
                left = _MARGIN + label_w + c * (col_w + _GAP) + (col_w - tile.width) // 2
                canvas.paste(tile, (left, top + (cell - tile.height) // 2))
        y += panel.rows * (cell + _GAP)
        if panel.col_labels:
            for c, text in enumerate(panel.col_labels):
                tw, _ = _text_size(draw, text, text_font)
                draw.text((_MARGIN + label_w + c * (col_w + _GAP) + (col_w - tw) // 2, y), text, fill=_GREY,
                          font=text_font)
            y += line
        y += _MARGIN
    return canvas


def save(panels: list[Panel], path: str, **kwargs) -> str:
    """compose(...) written as PNG to ``path``; returns the path."""
    compose(panels, **kwargs).save(path)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(pixels: torch.Tensor) -> bytes:
    """A minimal PNG encoder (8-bit grey or RGB, no filtering) for when Pillow is missing.
    pixels: uint8 [H, W] or [H, W, 1|3]."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"encode_png: pixels must be uint8, got {pixels.dtype}")
    if pixels.dim() == 2:
        pixels = pixels[..., None]
    h, w, c = pixels.shape
    if c not in (1, 3):
        raise ValueError(f"encode_png: expected 1 or 3 channels, got {c}")
    raw = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), pixels.reshape(h, w * c)], dim=1)  # filter byte 0 per row
    header = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(raw.numpy().tobytes(), 6)) + _png_chunk(b"IEND", b""))


def png_bytes(pixels: torch.Tensor) -> bytes:
    """uint8 [H, W] or [H, W, 1|3] as PNG bytes (Pillow when installed, else the built-in encoder)."""
    try:
        from PIL import Image
    except ImportError:
        return encode_png(pixels)
    import io

    arr = pixels if pixels.dim() == 3 and pixels.shape[-1] == 3 else pixels.reshape(pixels.shape[0], pixels.shape[1])
    buffer = io.BytesIO()
    Image.fromarray(arr.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(pixels: torch.Tensor, path: str) -> str:
    """Write uint8 [H, W, C] as a PNG at ``path`` atomically: a temporary file in the same folder, then a
    rename, so a reader (or a resumed run) never sees a half-written image."""
    data = png_bytes(pixels)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
