"""Glyphs-40: a small, download-free dataset of 40 printed letters with an open-font test split.

Every glyph is rendered with Pillow from the TrueType fonts matplotlib bundles, jittered, and
split by font family, so validation and test fonts are never seen in training. What the images
are, which faces are kept, how the split is dealt, sizes, font licences, known limits: the README's
"Data card: glyphs"."""

from __future__ import annotations

import functools
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.ft2font import FT2Font
from PIL import Image, ImageDraw, ImageFont

GLYPH_CLASSES = "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "abdefghijnqrty"
FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = {"train": 0.60, "val": 0.15, "test": 0.25}
MIN_FONTS = {"train": 1, "val": 2, "test": 3}  # so no val or test score rests on one face

SUPERSAMPLE = 4  # render and jitter at 4x, then box-downsample: cheap anti-aliasing
CAP_HEIGHT = 0.55  # capitals take this fraction of the image height...
MAX_EXTENT = 0.80  # ...unless the face's largest glyph would then exceed this fraction
# Computer Modern ships one file per face and each file names its own family: group them by hand
_CM_FAMILIES = {**dict.fromkeys(("cmr10", "cmb10", "cmti10", "cmmi10"), "Computer Modern Roman"),
                "cmss10": "Computer Modern Sans", "cmtt10": "Computer Modern Typewriter"}
_UNASSIGNED = "\u0378"  # not a Unicode character: every face draws its .notdef glyph for it


# fonts: which faces draw our 40 characters as letters ---------------------------------------------


def _ink(font: ImageFont.FreeTypeFont, char: str) -> Image.Image | None:
    """The character drawn white on black, cropped to its ink; None if it draws nothing."""
    px = int(font.size)
    canvas = Image.new("L", (4 * px, 4 * px), 0)  # roomy: italics and descenders overhang
    ImageDraw.Draw(canvas).text((px, px), char, fill=255, font=font)
    box = canvas.getbbox()
    return canvas.crop(box) if box else None


def _maps_to_named_glyphs(path: Path, chars: str) -> bool:
    """True if the cmap sends each character to a glyph carrying the character's own name.
    Symbol fonts put maths glyphs in the ASCII slots (cmsy10 draws a turnstile for 'a'), which
    would pass any "renders something distinct" test; their glyph names give them away."""
    ft = FT2Font(str(path))
    for c in chars:
        index = ft.get_char_index(ord(c))
        if index == 0 or ft.get_glyph_name(index) != c:
            return False
    return True


def _renders_letters(path: Path, chars: str = GLYPH_CLASSES) -> bool:
    """The face's glyphs are letters, non-empty, not the missing-glyph box, pairwise distinct."""
    if not _maps_to_named_glyphs(path, chars):
        return False
    font = ImageFont.truetype(str(path), 48)
    notdef = _ink(font, _UNASSIGNED)
    seen = set()
    for c in chars:
        ink = _ink(font, c)
        if ink is None:
            return False
        key = (ink.size, ink.tobytes())
        if notdef is not None and key == (notdef.size, notdef.tobytes()):
            return False
        seen.add(key)
    return len(seen) == len(chars)


@functools.cache
def _scan(font_dir: Path) -> tuple[tuple[str, Path], ...]:
    paths = [p for p in font_dir.iterdir() if p.suffix.lower() in (".ttf", ".otf")]
    return tuple((p.stem, p) for p in sorted(paths, key=lambda p: p.stem) if _renders_letters(p))


def usable_faces(font_dir: str | Path = FONT_DIR) -> dict[str, Path]:
    """Face name (the file stem) -> font file, sorted by name, for the faces that draw letters."""
    return dict(_scan(Path(font_dir)))  # scanned once (~0.2 s), a fresh dict for every caller


def font_family(face: str) -> str:
    """The design a face belongs to, e.g. 'DejaVuSerif-BoldItalic' -> 'DejaVu Serif'."""
    if face in _CM_FAMILIES:
        return _CM_FAMILIES[face]
    return ImageFont.truetype(str(usable_faces()[face]), 12).getname()[0]


# the split: by family, so no design is seen both in training and at test time ---------------------


def _deal(groups: list[list[str]]) -> dict[str, list[str]]:
    """Deal groups of faces, largest first, each to the split furthest below its target size."""
    n = sum(len(g) for g in groups)
    target = {s: max(MIN_FONTS[s], round(SPLIT_FRACTIONS[s] * n)) for s in ("val", "test")}
    target["train"] = n - target["val"] - target["test"]
    split: dict[str, list[str]] = {s: [] for s in SPLITS}
    # sorted() is stable, so groups of equal size keep the seeded order they came in
    for group in sorted(groups, key=len, reverse=True):
        split[max(SPLITS, key=lambda s: target[s] - len(split[s]))].extend(group)
    return {s: sorted(split[s]) for s in SPLITS}


def split_fonts(faces: list[str], rng: np.random.Generator) -> dict[str, list[str]]:
    """Assign faces to train/val/test, keeping families together when that stays balanced."""
    family = {f: font_family(f) for f in faces}
    families = sorted(set(family.values()))
    order = rng.permutation(len(families))
    groups = [[f for f in faces if family[f] == families[i]] for i in order]
    split = _deal(groups)
    if any(len(split[s]) < MIN_FONTS[s] for s in SPLITS):
        # too few families to meet the minimums: fall back to a face-level split
        split = _deal([[faces[i]] for i in rng.permutation(len(faces))])
    if any(len(split[s]) < MIN_FONTS[s] for s in SPLITS):
        raise RuntimeError(f"only {len(faces)} usable faces, cannot split them: {faces}")
    return split


# rendering ----------------------------------------------------------------------------------------


def _clean_glyphs(path: Path, canvas: int) -> list[Image.Image]:
    """All 40 glyphs of one face, white on black, centred by their ink box on a canvas^2 image."""
    ref = ImageFont.truetype(str(path), 64)
    sizes = np.array([_ink(ref, c).size for c in GLYPH_CLASSES])  # (w, h) per glyph
    cap = np.median(sizes[:26, 1])
    # one point size per face, so that relative glyph sizes within the face survive
    scale = min(CAP_HEIGHT * canvas / cap, MAX_EXTENT * canvas / sizes.max())
    font = ImageFont.truetype(str(path), max(1, round(64 * scale)))
    glyphs = []
    for c in GLYPH_CLASSES:
        ink = _ink(font, c)
        if max(ink.size) > canvas:  # rounding the point size up can overshoot by a pixel or two
            ink.thumbnail((canvas, canvas))
        image = Image.new("L", (canvas, canvas), 0)
        image.paste(ink, ((canvas - ink.width) // 2, (canvas - ink.height) // 2))
        glyphs.append(image)
    return glyphs


def _downsample(hires: np.ndarray, factor: int) -> np.ndarray:
    """Box-average [n, H, W] by an integer factor (what a camera pixel would integrate)."""
    n, h, w = hires.shape
    return hires.reshape(n, h // factor, factor, w // factor, factor).mean(axis=(2, 4))


def render_clean_glyphs(face: str, size: int = 32) -> np.ndarray:
    """uint8 [40, size, size]: the undistorted glyphs of one face, in GLYPH_CLASSES order."""
    glyphs = _clean_glyphs(usable_faces()[face], size * SUPERSAMPLE)
    hires = np.stack([np.asarray(g, dtype=np.float32) for g in glyphs])
    return np.round(_downsample(hires, SUPERSAMPLE)).astype(np.uint8)


def _affine_coeffs(angle: float, scale: float, shear: float, shift: np.ndarray, canvas: int):
    """PIL's AFFINE data for: shear and scale, then rotate, about the centre, then translate.
    PIL wants the inverse map (output pixel -> input pixel), so we invert the forward matrix."""
    cos, sin = np.cos(angle), np.sin(angle)
    forward = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, shear], [0.0, 1.0]]) * scale
    inverse = np.linalg.inv(forward)
    centre = np.full(2, canvas / 2)
    offset = centre - inverse @ (centre + shift)
    return (*inverse[0], offset[0], *inverse[1], offset[1])


def _morph(x: np.ndarray, k: int, op: np.ufunc) -> np.ndarray:
    """Grey dilation (op=np.maximum) or erosion (np.minimum) of [n, H, W] by a k x k square."""
    r, (h, w) = k // 2, x.shape[1:]
    padded = np.pad(x, ((0, 0), (r, r), (r, r)))
    rows = functools.reduce(op, (padded[:, :, i : i + w] for i in range(k)))  # separable
    return functools.reduce(op, (rows[:, i : i + h] for i in range(k)))


def _jitter_face(glyphs: list[Image.Image], params: np.ndarray, size: int) -> np.ndarray:
    """float32 [40 * spf, size, size] jittered variants; params [40, spf, 6] from build_glyphs."""
    canvas = size * SUPERSAMPLE
    hires = np.empty((params.shape[0] * params.shape[1], canvas, canvas), dtype=np.uint8)
    flat = params.reshape(-1, params.shape[-1])
    for i, (angle, scale, shear, dx, dy, _) in enumerate(flat):
        coeffs = _affine_coeffs(angle, scale, shear, np.array([dx, dy]) * SUPERSAMPLE, canvas)
        glyph = glyphs[i // params.shape[1]]
        hires[i] = glyph.transform(glyph.size, Image.AFFINE, coeffs, Image.BILINEAR)
    # strokes: a quarter get thicker by half an output pixel on each side, a quarter thinner by
    # a quarter pixel only: hairlines of the light serif faces are barely a pixel wide at 32 px
    stroke = flat[:, 5]
    thick, thin = stroke < 0.25, stroke >= 0.75
    hires[thick] = _morph(hires[thick], SUPERSAMPLE + 1, np.maximum)
    hires[thin] = _morph(hires[thin], SUPERSAMPLE // 2 + 1, np.minimum)
    return _downsample(hires.astype(np.float32), SUPERSAMPLE)


def build_glyphs(seed: int = 0, size: int = 32, samples_per_font: int = 12) -> dict:
    """Render the dataset. Returns numpy arrays and name lists: ``{split}_images`` uint8
    [N, size, size], ``{split}_labels`` int64 [N] (index into ``class_names``), ``{split}_fonts``
    list[str] (face names), ``{split}_font_ids`` int64 [N] (index into ``{split}_fonts``),
    ``class_names`` list[str], for split in train/val/test, with N = len({split}_fonts) * 40 *
    samples_per_font."""
    rng = np.random.default_rng(seed)
    faces = list(usable_faces())  # sorted by name
    split = split_fonts(faces, rng)

    # all random numbers up front, in one fixed order: faces (sorted) x classes x variants
    shape = (len(faces), len(GLYPH_CLASSES), samples_per_font)
    params = np.stack([np.deg2rad(rng.uniform(-12, 12, shape)),  # rotation
                       rng.uniform(0.8, 1.1, shape),  # scale
                       rng.uniform(-0.15, 0.15, shape),  # shear
                       rng.uniform(-1, 1, shape) * size / 16,  # x shift, output pixels
                       rng.uniform(-1, 1, shape) * size / 16,  # y shift
                       rng.uniform(0, 1, shape)],  # stroke: <0.25 thicker, >=0.75 thinner
                      axis=-1)
    sigma = rng.uniform(2, 16, shape)  # noise strength per image, in grey levels
    noise = rng.standard_normal((*shape, size, size), dtype=np.float32)

    canvas = size * SUPERSAMPLE
    images = np.stack([_jitter_face(_clean_glyphs(path, canvas), params[i], size)
                       for i, path in enumerate(usable_faces().values())])
    images = images.reshape(*shape, size, size)
    images += noise * sigma[..., None, None].astype(np.float32)
    images = np.clip(np.round(images), 0, 255).astype(np.uint8)

    out: dict = {"class_names": list(GLYPH_CLASSES)}
    labels = np.arange(len(GLYPH_CLASSES), dtype=np.int64)
    for s in SPLITS:
        idx = [faces.index(f) for f in split[s]]
        n = len(idx)
        out[f"{s}_images"] = images[idx].reshape(-1, size, size)
        out[f"{s}_labels"] = np.broadcast_to(labels[None, :, None], (n, *shape[1:])).ravel()
        out[f"{s}_font_ids"] = np.repeat(np.arange(n, dtype=np.int64), shape[1] * shape[2])
        out[f"{s}_fonts"] = split[s]
    return out


# cache --------------------------------------------------------------------------------------------

_NAME_KEYS = ("class_names", *(f"{s}_fonts" for s in SPLITS))


def load_glyphs(
    root: str | Path = "data", seed: int = 0, size: int = 32, samples_per_font: int = 12
) -> dict:
    """``build_glyphs`` through a cache at root/glyphs/glyphs-s{seed}-{size}px-{spf}.npz."""
    path = Path(root) / "glyphs" / f"glyphs-s{seed}-{size}px-{samples_per_font}.npz"
    if not path.exists():
        from csdkit.runs import atomic_write

        data = build_glyphs(seed=seed, size=size, samples_per_font=samples_per_font)
        arrays = {k: np.asarray(v) for k, v in data.items()}  # names as unicode: no pickle

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file, not a name: savez would append ".npz"
                np.savez_compressed(f, **arrays)

        atomic_write(path, write)
    with np.load(path) as npz:
        return {k: npz[k].tolist() if k in _NAME_KEYS else npz[k] for k in npz.files}
