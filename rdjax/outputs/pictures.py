"""Pictures a person checks: an image blended with its map, the decision picture (header,
image, overlay, colour bar), the hardest cases of an evaluation and their pictures, and
what a recipe's centre crop leaves out."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from rdjax.data.preprocess import Recipe
from rdjax.runtime.disk import atomic_path

CROP_NOTE_AREA = 0.05
"""A recipe's centre crop is stated when it cuts more than this share of an image's area.
5% of the area is a band of about 1.3% of the side along each edge (13 px of a 1024 px
part): framing margins are wider, and few marked defects are that thin. A larger crop
can hide a whole defect near an edge (Dinomaly's official 448 -> 392 cuts 23%; 448 ->
126 leaves 8% of the image)."""


def seen_fraction(recipe: Recipe) -> float:
    """The share of an image's area the model sees through the recipe's centre crop."""
    side = recipe.resize or recipe.size
    return min(1.0, (recipe.size / side) ** 2)


def crop_note(recipe: Recipe) -> str | None:
    """What a run says when it starts where the recipe's crop cuts more than CROP_NOTE_AREA
    of each image, else None."""
    seen = seen_fraction(recipe)
    if 1 - seen <= CROP_NOTE_AREA:
        return None
    side = recipe.resize
    return (
        f"the model sees the central {recipe.size}x{recipe.size} px of each image resized to {side}x{side}: "
        f"{100 * seen:.3g}% of its area ({100 * recipe.size / side:.3g}% of each side); the border outside "
        f"is not inspected (config.input.resize={side}, config.image_size={recipe.size})"
    )


def fit_image(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 image at a map's ``shape``: where config.map_size gives maps of another size
    than the model's inputs, the picture shows the input resized to the map."""
    if image.shape[:2] == tuple(shape):
        return image
    from PIL import Image

    height, width = shape[:2]
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def overlay(image: np.ndarray, amap: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """uint8 image blended half and half with the map in the 'jet' colour map (fixed lo..hi);
    an image of another size than the map (config.map_size) is resized to it first."""
    from matplotlib import colormaps

    image = fit_image(image, amap.shape)

    heat = colormaps["jet"](np.clip((amap - lo) / max(hi - lo, 1e-12), 0, 1))[..., :3]
    return (np.clip(0.5 * image.astype(np.float32) / 255.0 + 0.5 * heat, 0, 1) * 255).astype(np.uint8)


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The mask's pixels within ``width`` steps (4-neighbourhood) of a pixel outside it: an
    edge drawn inside the mask, so it never covers what lies outside. The image border
    counts as inside, so a mask reaching the border is not outlined along it."""
    inner = mask
    for _ in range(width):
        m = np.pad(inner, 1, mode="edge")
        inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def outcome(label: int, anomalous: bool | None) -> str:
    """What happened to a labelled image: true/false positive/negative ('anomalous' is
    the positive class), or its label alone where there is no threshold."""
    if anomalous is None:
        return "defective" if label else "good"
    return f"{'true' if bool(label) == bool(anomalous) else 'false'} {'positive' if anomalous else 'negative'}"


DECISION_COLOURS = {True: (190, 30, 30), False: (30, 130, 60), None: (90, 90, 90)}
MIN_PICTURE = 256  # px: a smaller image is enlarged (nearest neighbour) to this on its longer side
MIN_TEXT = 14  # px: the header's font size on the smallest pictures


@dataclasses.dataclass(frozen=True)
class _Marks:
    """A decision picture's mark sizes in pixels: fixed fractions of the body's height, so
    a 2,000 px picture reads as a 256 px one does, with floors for small pictures."""

    text: int  # font size
    line: int  # outline width
    radius: int  # the peak marker's radius
    ring: int  # its stroke
    bar: int  # the colour bar's width
    gap: int  # between panels

    @classmethod
    def for_height(cls, height: int) -> _Marks:
        return cls(
            text=max(MIN_TEXT, round(height * 0.035)),
            line=max(1, round(height / 350)),
            radius=max(8, round(height * 0.03)),
            ring=max(2, round(height / 400)),
            bar=max(12, round(height * 0.025)),
            gap=max(4, round(height / 100)),
        )


def _fit_left(text: str, font: Any, width: float) -> str:
    """``text`` cut at its start until it fits ``width`` px (a path's end says most)."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength("…" + text) > width:
        text = text[1:]
    return "…" + text


SHADE = 0.4  # brightness kept where the model did not look: darkened ...
HATCH = (150, 150, 150)  # ... and crossed by grey diagonal lines, unlike any colour of the map's scale


def shade_uninspected(panel: np.ndarray, image: np.ndarray, inspected: np.ndarray) -> np.ndarray:
    """``panel`` (uint8 H x W x 3) with what the model did not inspect (outside the bool
    ``inspected``, e.g. the border a centre crop cut away) replaced by the ``image``
    darkened to SHADE and hatched: a map is 0 there, which the colour scale would draw as
    'inspected and fine'. The hatch's lines are 1 / 8 of their spacing wide, the spacing
    2% of the panel's height (at least 6 px), so they read at any resolution."""
    h, w = inspected.shape
    spacing = max(6, round(0.02 * h))
    yy, xx = np.mgrid[0:h, 0:w]
    hatch = (yy + xx) % spacing < max(1, spacing // 8)
    out = panel.copy()
    outside = ~inspected
    out[outside] = (image[outside] * SHADE).astype(np.uint8)
    out[outside & hatch] = HATCH
    return out


def inspected_region(shape: tuple[int, int], recipe: Recipe) -> np.ndarray:
    """bool (H, W): the part of an image of ``shape`` the model saw through the recipe's
    centre crop (all of it without a crop), as rdjax.scoring.tiling.uncrop_map places a map."""
    from rdjax.scoring.tiling import uncrop_map

    return uncrop_map(np.ones((recipe.size, recipe.size), np.float32), shape, recipe) > 0.5


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What a decision picture's header says: the image's score and decision (None: no
    threshold), its normalized score, the image threshold that decided it and whose that
    is (``category``: a category, 'global' for a unified model's global one, None when
    not known)."""

    score: float
    anomalous: bool | None = None
    normalized: float | None = None
    threshold: float | None = None
    category: str | None = None


@dataclasses.dataclass(frozen=True)
class Regions:
    """What a decision picture marks, each a bool array at the map's size: the predicted
    ``mask`` (outlined in white on the overlay), the ground truth ``truth`` (outlined in
    red on the plain image) and what the model ``inspected`` (the rest shaded)."""

    mask: np.ndarray | None = None
    truth: np.ndarray | None = None
    inspected: np.ndarray | None = None


def header_lines(verdict: Verdict, caption: str) -> list[str]:
    """A decision picture's header: the decision and the score against the threshold
    that decided it, with whose threshold that is (Verdict.category), then the caption."""
    score, anomalous, normalized, threshold = verdict.score, verdict.anomalous, verdict.normalized, verdict.threshold
    decided = {None: "", True: "NG   ", False: "OK   "}[anomalous]
    against = "" if threshold is None or anomalous is None else f" {'>=' if anomalous else '<'} {threshold:.4g}"
    first = f"{decided}score {score:.4f}{against}" + ("" if normalized is None else f"   normalized {normalized:.2f}")
    if threshold is None:
        return [first, caption]
    category = verdict.category
    whose = {None: "", "global": " (global, over every category)"}.get(category, f" of category {category}")
    return [first, f"image threshold {threshold:.4g}{whose}", caption]


@dataclasses.dataclass(frozen=True)
class _Layout:
    """A decision picture's sizes in pixels: the image enlarged ``scale`` times to panels of
    ``height`` x ``width``, its marks (_Marks), fonts, padding and header line height."""

    scale: int
    height: int
    width: int
    marks: _Marks
    font: Any
    small: Any  # the colour bar's labels
    pad: int
    line_h: int

    @classmethod
    def for_map(cls, shape: tuple[int, ...]) -> _Layout:
        from PIL import ImageFont

        h, w = shape[:2]
        scale = max(1, -(-MIN_PICTURE // max(h, w)))
        marks = _Marks.for_height(h * scale)
        font = ImageFont.load_default(size=marks.text)
        small = ImageFont.load_default(size=max(MIN_TEXT, round(marks.text * 0.8)))
        return cls(scale, h * scale, w * scale, marks, font, small, max(3, marks.text // 3), round(marks.text * 1.3))

    @property
    def bar_x(self) -> int:
        return 2 * self.width + 2 * self.marks.gap


def _panels(
    image: np.ndarray, amap: np.ndarray, lo_hi: tuple[float, float], regions: Regions, line: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The plain image with its truth outlined, the overlay with the mask outlined and
    what the model did not see shaded, and the map whose peak is marked (one the model
    saw), all at the map's size; outlines ``line`` px wide."""
    plain = image.copy()
    if regions.truth is not None:
        plain[outline(regions.truth, line)] = (255, 0, 0)
    body = overlay(image, amap, *lo_hi)
    if regions.mask is not None:
        body[outline(regions.mask, line)] = 255
    if regions.inspected is not None:
        body = shade_uninspected(body, image, regions.inspected)
        amap = np.where(regions.inspected, amap, -np.inf)  # the peak marked is one the model saw
    return plain, body, amap


def _ticks(lo: float, hi: float, threshold: float | None, height: int) -> list[tuple[float, int, str]]:
    """The colour bar's ticks (value, row, label): its top, middle or threshold, bottom."""
    if threshold is None:
        return [(hi, 0, ""), ((lo + hi) / 2, height // 2, ""), (lo, height - 1, "")]
    at = int(np.clip(round((hi - threshold) / max(hi - lo, 1e-12) * (height - 1)), 0, height - 1))
    return [(hi, 0, ""), (threshold, at, " threshold"), (lo, height - 1, "")]


def _ringed(body: np.ndarray, amap: np.ndarray, at: _Layout) -> Any:
    """The overlay enlarged, its map's peak circled (white, edged in black)."""
    from PIL import Image, ImageDraw

    heat = Image.fromarray(body).resize((at.width, at.height), Image.Resampling.NEAREST)
    ring = ImageDraw.Draw(heat)  # on the overlay alone: a peak at its edge must not mark the plain image
    py, px = np.unravel_index(int(np.argmax(amap)), amap.shape)
    marks = at.marks
    cx, cy, r, edge = (px + 0.5) * at.scale, (py + 0.5) * at.scale, marks.radius, max(1, marks.ring // 2)
    ring.ellipse((cx - r - edge, cy - r - edge, cx + r + edge, cy + r + edge), outline=(0, 0, 0), width=edge)
    ring.ellipse((cx - r, cy - r, cx + r, cy + r), outline=(255, 255, 255), width=marks.ring)
    return heat


def _draw_header(draw: Any, width: int, header: int, lines: list[str], colour: tuple, at: _Layout) -> None:
    """The header's band in the decision's colour, its lines, and the caption cut to fit."""
    pad, line_h, font = at.pad, at.line_h, at.font
    draw.rectangle((0, 0, width, header - 1), fill=colour)
    for k, line in enumerate(lines[:-1]):
        draw.text((pad, pad + k * line_h), line, fill=(255, 255, 255), font=font)
    caption_y = pad + (len(lines) - 1) * line_h
    draw.text((pad, caption_y), _fit_left(lines[-1], font, width - 2 * pad), fill=(255, 255, 255), font=font)


def _draw_bar(canvas: Any, draw: Any, ticks: list[tuple[float, int, str]], header: int, at: _Layout) -> None:
    """The colour bar right of the panels, with its ticks and their labels."""
    from matplotlib import colormaps
    from PIL import Image

    bar_x, bh, marks, pad = at.bar_x, at.height, at.marks, at.pad
    ramp = colormaps["jet"](np.linspace(1, 0, bh))[:, :3]
    canvas.paste(
        Image.fromarray((np.repeat(ramp[:, None, :], marks.bar, axis=1) * 255).astype(np.uint8)), (bar_x, header)
    )
    for value, y, what in ticks:
        draw.line(
            (bar_x + marks.bar, header + y, bar_x + marks.bar + pad, header + y),
            fill=(0, 0, 0),
            width=max(1, marks.ring // 2),
        )
        anchor = "la" if y == 0 else "ld" if y == bh - 1 else "lm"
        label = f"{value:.3g}{what}"
        draw.text((bar_x + marks.bar + pad + 2, header + y), label, fill=(0, 0, 0), font=at.small, anchor=anchor)


def decision_picture(
    image: np.ndarray,
    amap: np.ndarray,
    lo_hi: tuple[float, float],
    verdict: Verdict,
    regions: Regions = Regions(),
    caption: str = "",
) -> np.ndarray:
    """One image as a person checks it: a header (`header_lines`: the decision, NG red, OK
    green, grey without a threshold; the score against the threshold that decided and
    whose it is; the normalized score; the caption); the plain image (its ground truth
    outlined in red, where given) beside the image blended with its map on the colour
    scale ``lo_hi`` (thresholds.colour_scale: the threshold in the middle), with the
    mask's outline in white, the map's peak circled and what the model did not see
    (Regions.inspected) shaded (`shade_uninspected`); and a colour bar with its range and
    the threshold marked. The picture keeps the image's resolution (small images are
    enlarged, nearest neighbour, to MIN_PICTURE px), and its text, outlines, marker and
    bar grow with it (_Marks)."""
    from PIL import Image, ImageDraw

    image = fit_image(image, amap.shape)
    at = _Layout.for_map(amap.shape)
    plain, body, amap = _panels(image, amap, lo_hi, regions, max(1, round(at.marks.line / at.scale)))
    state = None if verdict.anomalous is None else bool(verdict.anomalous)
    lines = header_lines(dataclasses.replace(verdict, anomalous=state), caption)
    header = 2 * at.pad + len(lines) * at.line_h
    ticks = _ticks(*lo_hi, verdict.threshold, at.height)
    label_w = max(int(at.small.getlength(f"{v:.3g}{what}")) for v, _, what in ticks) + 2 * at.pad
    text_w = max(int(at.font.getlength(line)) for line in lines[:-1]) + 2 * at.pad  # the caption is cut to fit
    width = max(at.bar_x + at.marks.bar + at.marks.gap + label_w, text_w)  # narrow images
    canvas = Image.new("RGB", (width, header + at.height), (255, 255, 255))
    heat = _ringed(body, amap, at)
    canvas.paste(Image.fromarray(plain).resize((at.width, at.height), Image.Resampling.NEAREST), (0, header))
    canvas.paste(heat, (at.width + at.marks.gap, header))
    draw = ImageDraw.Draw(canvas)
    _draw_header(draw, canvas.width, header, lines, DECISION_COLOURS[state], at)
    _draw_bar(canvas, draw, ticks, header, at)
    return np.asarray(canvas)


def hardest_cases(labels: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``k`` highest-scoring good images and the ``k`` lowest-scoring
    defective ones: the candidates for false positives and false negatives."""
    good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels != 0)
    return good[np.argsort(-scores[good], kind="stable")][:k], bad[np.argsort(scores[bad], kind="stable")][:k]


@dataclasses.dataclass
class Cases:
    """The hardest cases of an evaluation with their maps: all a report shows, and all
    it keeps (the other maps of the pass are gone)."""

    rows: np.ndarray
    images: np.ndarray  # uint8 (k, S, S, 3)
    masks: np.ndarray  # bool (k, S, S)
    maps: np.ndarray  # float32 (k, S, S)
    scores: np.ndarray
    filenames: list[str]
    labels: np.ndarray
    lo: float  # the colour scale: thresholds.colour_scale of the threshold, else the pass's pixel range
    hi: float


def write_overlays(directory: Path, cases: Cases, threshold: float | None, category: str | None = None) -> list[Path]:
    """A decision picture with the ground truth for each of the hardest cases, named by
    rank, outcome and file, its header naming ``category``'s ``threshold``. Maps share
    one colour scale (cases.lo..hi)."""
    from PIL import Image

    paths = []
    for rank in range(len(cases.rows)):
        score = float(cases.scores[rank])
        anomalous = None if threshold is None else score >= threshold
        what = outcome(int(cases.labels[rank]), anomalous)
        picture = decision_picture(
            cases.images[rank],
            cases.maps[rank],
            (cases.lo, cases.hi),
            Verdict(score, anomalous, threshold=threshold, category=category),
            Regions(truth=cases.masks[rank]),
            caption=f"{what}: {cases.filenames[rank]}",
        )
        name = cases.filenames[rank].replace("/", "_").rsplit(".", 1)[0]
        path = directory / f"{rank:02d}_{what.replace(' ', '_')}_{name}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(picture).save(tmp)
        paths.append(path)
    return paths
