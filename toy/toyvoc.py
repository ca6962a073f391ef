"""ToyVOC: a small synthetic dataset in the exact PASCAL VOC 2012 layout, with spurious background cues.

    python -m toy.toyvoc --out Data/ToyVOC --ood_out WOoD_dataset/toy --seed 0

Why it exists: W-OoD fixes classifiers that rely on backgrounds which co-occur with a class (rails for
train, water for boat). ToyVOC reproduces that problem on a CPU budget. Six VOC "cue classes" are
shown in side-view scenes split by a horizon into a top and a bottom region, each with its cue:

    class      cue (region)        class      cue (region)
    aeroplane  sky (top)           car        road (bottom)
    bird       tree + branch (top) cow        grass (bottom)
    boat       water (bottom)      train      rails (bottom)

Three "distractor" classes (chair, person, tvmonitor) have no cue and stand on generic "stuff"
(bricks, tiles, blotches, stripes in saturated warm colours). An image holds one class, or a top
cue class plus a bottom (cue or distractor) class; with `swap_prob` the two regions trade places
(sky below), so that where the stuff sits is no evidence. A region without a cue class shows generic
stuff, so a cue never appears without its class (unless `--foreign_cue_prob`, off by default: then such
a region may show the cue of an absent class). A cue shows only near its object (`--cue_reach`: within
15 % of the long side by default, 1.5 times the objects' area; 0 paints the whole region, the earlier
default), as rails under a train, and generic stuff fills the rest of its region. A one-class image
always shows its cue; an image with two cue classes shows only one of its two cues with `cue_drop_prob`
(by default a cue is with its class about 94 % of the time). Cues have fixed colour ranges and textures;
objects have class-specific silhouettes but random colours and patterns, so the cue is the easier
evidence: a classifier trained on train_aug fires on cue-only images and puts much of its CAM on cues.

Outputs (`--out`, the VOC layout): JPEGImages/<id>.jpg, Annotations/<id>.xml, SegmentationClass/<id>.png
(palette PNG for train and val, void band of 255 around objects), SegmentationObject/<id>.png (train and
val, VOC's instance format: palette PNG, object k of the image is k, background 0, the same void band 255),
SegmentationClassAug/<id>.png
(grayscale PNG, same labels, for train_aug and val), ImageSets/Segmentation/{train,val,trainval}.txt.
Outside the VOC layout: CueMasks/<id>.png (0 = no cue, k+1 = a pixel of class k's cue; object pixels
are never cue pixels) and toyvoc.json (parameters, ids, counts). `train_aug` is every id with an Aug
label minus `val`; `train` is a subset of it.

OoD candidates (`--ood_out`): images/<name>.jpg (a few grayscale JPEGs and palette PNGs among them),
CueMasks/<name>.png (as for the ID images), candidates.txt (paths relative to --ood_out) and
manifest.json ([{"path", "hard", "cue", "cue_kind", "mode", "cue_mask"}]). Hard
candidates are scenes drawn by the same code with one class's cue and no object; easy ones show only
generic stuff.

Every image is drawn by its own numpy Generator seeded from (seed, kind, index): same seed -> the same
bytes, no global random state.
"""
import argparse
import colorsys
import os
import time

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from misc.utils import InputError, atomic_path, palette_voc, save_json, save_png

CAT_LIST = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
            "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
            "train", "tvmonitor")
CUE_OF = {"aeroplane": "sky", "bird": "tree", "boat": "water", "car": "road", "cow": "grass",
          "train": "rails"}
TOP_CLASSES = ("aeroplane", "bird")
BOTTOM_CLASSES = ("boat", "car", "cow", "train")
CUE_CLASSES = TOP_CLASSES + BOTTOM_CLASSES
# classes without a cue, always on generic stuff: they make "generic stuff everywhere" a common sight
# in negatives of every cue class, so that an image of stuff alone is no evidence of a cue class
DISTRACTOR_CLASSES = ("chair", "person", "tvmonitor")
TOY_CLASSES = CUE_CLASSES + DISTRACTOR_CLASSES

# salts of the per-image generators, so that ID and OoD images never share a random stream
STREAM_ID, STREAM_OOD, STREAM_PLAN = 1, 2, 3
JPEG_QUALITY = 90
PIXEL_NOISE_STD = 3.0           # sensor-like noise added to every image (0-255 scale)
GENERIC_HUES = ((0.0, 0.13), (0.75, 1.0))   # warm and purple: never the hue of a cue
MIN_VISIBLE_OBJECT_PIXELS = 0.01  # fraction of the image an object must keep after occlusion
# typical body hue per class (used with --class_colour_prob), away from the hue of the class's own cue
CLASS_HUE = {"aeroplane": 0.0, "bird": 0.1, "boat": 0.83, "car": 0.72, "cow": 0.15, "train": 0.33,
             "chair": 0.45, "person": 0.6, "tvmonitor": 0.92}


# ----------------------------------------------------------------------------------------------------
# colours and textures (full-canvas float32 arrays, values 0..255)

def hsv(h, s, v):
    """One RGB colour (3,) float32 on the 0..255 scale from HSV in [0, 1] (h wraps)."""
    return np.array(colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))),
                    dtype=np.float32) * 255


def smooth_noise(rng, h, w, cell_h, cell_w=None):
    """(h, w) float32 noise in [0, 1], smooth over `cell_h` x `cell_w` pixels (bicubic upsampling)."""
    cell_w = cell_h if cell_w is None else cell_w
    gh, gw = int(np.ceil(h / cell_h)) + 1, int(np.ceil(w / cell_w)) + 1
    low = rng.random((gh, gw), dtype=np.float32)
    big = Image.fromarray(low).resize((int(np.ceil(gw * cell_w)), int(np.ceil(gh * cell_h))), Image.BICUBIC)
    return np.clip(np.asarray(big)[:h, :w], 0, 1)


def mix(a, b, t):
    """Per-pixel blend of colours a, b (3,) with weights t (h, w) -> (h, w, 3)."""
    t = np.asarray(t, dtype=np.float32)[..., None]
    return a * (1 - t) + b * t


def grid(h, w):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy, xx


def random_pattern(rng, h, w, base, second):
    """An object surface: plain, stripes, spots or a gradient between two colours, with shading."""
    yy, xx = grid(h, w)
    kind = rng.choice(["plain", "stripes", "spots", "gradient"], p=[0.3, 0.25, 0.25, 0.2])
    if kind == "plain":
        t = 0.25 * smooth_noise(rng, h, w, max(2.0, w / 12))
    elif kind == "stripes":
        angle, period = rng.uniform(0, np.pi), rng.uniform(0.04, 0.1) * w
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) / period
        t = (np.sin(2 * np.pi * phase) > 0).astype(np.float32)
    elif kind == "spots":
        t = (smooth_noise(rng, h, w, max(2.0, w / 14)) > rng.uniform(0.55, 0.7)).astype(np.float32)
    else:
        angle = rng.uniform(0, 2 * np.pi)
        proj = xx * np.cos(angle) + yy * np.sin(angle)
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
    shade = 0.85 + 0.3 * smooth_noise(rng, h, w, max(2.0, w / 6))
    return np.clip(mix(base, second, t) * shade[..., None], 0, 255)


def random_object_colour(rng):
    return hsv(rng.random(), rng.uniform(0.15, 0.9), rng.uniform(0.3, 0.95))


def class_object_colour(rng, cls):
    """A saturated colour near the class's own hue (CLASS_HUE): object evidence that is learnable."""
    return hsv(CLASS_HUE[cls] + rng.uniform(-0.03, 0.03), rng.uniform(0.6, 0.9), rng.uniform(0.55, 0.9))


# ----------------------------------------------------------------------------------------------------
# backgrounds: generic stuff and the six cues. Each painter fills the whole canvas; the scene keeps
# the region it needs. `anchors` are (x, y) points that must lie on the cue's support (the rail under
# a train, the branch under a bird).

def paint_generic(rng, h, w, anchors=()):
    """Stuff that is no cue: bricks, tiles, blotches or stripes in warm / purple colours."""
    lo, hi = GENERIC_HUES[rng.integers(len(GENERIC_HUES))]
    hue = rng.uniform(lo, hi)
    base = hsv(hue, rng.uniform(0.4, 0.8), rng.uniform(0.4, 0.85))
    other = hsv(hue + rng.uniform(-0.06, 0.06), rng.uniform(0.35, 0.8), rng.uniform(0.3, 0.9))
    yy, xx = grid(h, w)
    kind = rng.choice(["bricks", "tiles", "blotches", "stripes"])
    if kind == "bricks":
        bh = rng.uniform(0.05, 0.09) * w
        bw = bh * rng.uniform(1.8, 2.6)
        row = np.floor(yy / bh)
        shifted = xx + (row % 2) * bw / 2
        mortar = ((yy % bh) < max(1.0, bh * 0.15)) | ((shifted % bw) < max(1.0, bh * 0.15))
        t = np.where(mortar, 1.0, 0.25 * smooth_noise(rng, h, w, max(2.0, bh)))
    elif kind == "tiles":
        size = rng.uniform(0.08, 0.16) * w
        t = ((np.floor(yy / size) + np.floor(xx / size)) % 2).astype(np.float32)
        t = 0.8 * t + 0.2 * smooth_noise(rng, h, w, max(2.0, size / 2))
    elif kind == "blotches":
        t = smooth_noise(rng, h, w, rng.uniform(0.1, 0.25) * w)
    else:
        angle, period = rng.uniform(0, np.pi), rng.uniform(0.06, 0.15) * w
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    return np.clip(mix(base, other, t), 0, 255)


def paint_sky(rng, h, w, anchors=()):
    """Blue gradient, darker at the top, with white clouds."""
    hue = rng.uniform(0.56, 0.62)
    top = hsv(hue, rng.uniform(0.55, 0.85), rng.uniform(0.6, 0.8))
    bottom = hsv(hue, rng.uniform(0.2, 0.4), rng.uniform(0.9, 1.0))
    yy, _ = grid(h, w)
    sky = mix(top, bottom, yy / max(h - 1, 1))
    cloud = smooth_noise(rng, h, w, rng.uniform(0.06, 0.12) * w, rng.uniform(0.15, 0.3) * w)
    alpha = np.clip((cloud - rng.uniform(0.45, 0.65)) * 4, 0, 0.9)
    return mix_image(sky, np.full(3, 250, np.float32), alpha)


def paint_tree(rng, h, w, anchors=()):
    """Dark leafy canopy with brown branches; one branch passes through every anchor (a perch)."""
    leaf_dark = hsv(rng.uniform(0.27, 0.38), rng.uniform(0.55, 0.85), rng.uniform(0.18, 0.32))
    leaf_light = hsv(rng.uniform(0.22, 0.33), rng.uniform(0.5, 0.8), rng.uniform(0.45, 0.65))
    leaves = smooth_noise(rng, h, w, max(1.5, 0.025 * w))
    img = mix(leaf_dark, leaf_light, (leaves > 0.55).astype(np.float32) * 0.8 + 0.2 * leaves)
    bark = hsv(rng.uniform(0.05, 0.1), rng.uniform(0.45, 0.7), rng.uniform(0.25, 0.42))
    points = list(anchors) + [(rng.uniform(0, w), rng.uniform(0.1, 0.9) * h)
                              for _ in range(rng.integers(1, 3))]
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for x, y in points:
        slope = rng.uniform(-0.25, 0.25)
        width = max(2, int(round(rng.uniform(0.025, 0.04) * w)))
        draw.line([(0, y - slope * x), (w, y + slope * (w - x))], fill=255, width=width)
    branch = np.asarray(canvas) > 0
    shade = 0.8 + 0.4 * smooth_noise(rng, h, w, max(1.5, 0.02 * w))
    img[branch] = (bark * shade[branch][:, None])
    return np.clip(img, 0, 255)


def paint_water(rng, h, w, anchors=()):
    """Blue-green water with horizontal ripples that get wider towards the bottom (perspective)."""
    hue = rng.uniform(0.5, 0.6)
    deep = hsv(hue, rng.uniform(0.55, 0.85), rng.uniform(0.35, 0.55))
    light = hsv(hue - 0.02, rng.uniform(0.25, 0.45), rng.uniform(0.7, 0.9))
    yy, xx = grid(h, w)
    period = (0.03 + 0.04 * yy / max(h, 1)) * w
    wobble = smooth_noise(rng, h, w, 0.15 * w, 0.3 * w) * 3
    ripple = 0.5 + 0.5 * np.sin(2 * np.pi * (yy / period + wobble))
    return np.clip(mix(deep, light, ripple ** 3), 0, 255)


def paint_road(rng, h, w, anchors=()):
    """Grey asphalt, a light kerb band and dashed white lane markings."""
    grey = rng.uniform(0.22, 0.38)
    asphalt = hsv(rng.random(), rng.uniform(0, 0.06), grey)
    yy, xx = grid(h, w)
    grain = smooth_noise(rng, h, w, 1.5)
    img = asphalt * (0.85 + 0.3 * grain)[..., None]
    dash, gap = rng.uniform(0.1, 0.18) * w, rng.uniform(0.06, 0.12) * w
    thick = max(1.5, 0.012 * w)
    for frac in rng.uniform(0.15, 0.9, size=rng.integers(1, 3)):
        y = frac * h
        on = (np.abs(yy - y) < thick) & (((xx + rng.uniform(0, dash + gap)) % (dash + gap)) < dash)
        img[on] = hsv(rng.uniform(0.1, 0.16), rng.uniform(0, 0.6), 0.95)
    return np.clip(img, 0, 255)


def paint_grass(rng, h, w, anchors=()):
    """Green grass: vertical blades (noise stretched along y) over a yellow-green variation."""
    green = hsv(rng.uniform(0.22, 0.3), rng.uniform(0.55, 0.85), rng.uniform(0.45, 0.7))
    yellow = hsv(rng.uniform(0.15, 0.2), rng.uniform(0.5, 0.8), rng.uniform(0.6, 0.8))
    blades = smooth_noise(rng, h, w, max(2.0, 0.06 * w), 1.0)
    patches = smooth_noise(rng, h, w, 0.2 * w)
    img = mix(green, yellow, 0.6 * patches) * (0.7 + 0.5 * blades)[..., None]
    return np.clip(img, 0, 255)


def paint_rails(rng, h, w, anchors=()):
    """Grey-brown gravel with horizontal tracks (steel rail over dark sleepers); one under each anchor."""
    gravel = hsv(rng.uniform(0.55, 0.65), rng.uniform(0.0, 0.08), rng.uniform(0.45, 0.6))
    yy, xx = grid(h, w)
    speckle = rng.random((h, w), dtype=np.float32)
    img = gravel * (0.7 + 0.5 * speckle)[..., None]
    rail_ys = [y for _, y in anchors] + list(rng.uniform(0.2, 0.95, size=rng.integers(1, 3)) * h)
    steel = hsv(rng.uniform(0.55, 0.65), rng.uniform(0, 0.1), rng.uniform(0.7, 0.85))
    sleeper_col = hsv(rng.uniform(0.05, 0.1), rng.uniform(0.4, 0.6), rng.uniform(0.2, 0.3))
    rail_h = max(1.5, 0.015 * w)
    sleeper_h, pitch = max(2.0, 0.04 * w), rng.uniform(0.05, 0.08) * w
    for y in rail_ys:
        sleepers = (yy >= y) & (yy < y + sleeper_h) & ((xx % pitch) < 0.5 * pitch)
        img[sleepers] = sleeper_col
        img[(yy >= y - rail_h) & (yy < y)] = steel
    return np.clip(img, 0, 255)


CUE_PAINTERS = {"sky": paint_sky, "tree": paint_tree, "water": paint_water, "road": paint_road,
                "grass": paint_grass, "rails": paint_rails}


def mix_image(a, b, alpha):
    """Blend image a (h, w, 3) towards colour/image b with per-pixel alpha (h, w)."""
    return a * (1 - alpha[..., None]) + b * alpha[..., None]


# ----------------------------------------------------------------------------------------------------
# objects: side views as polygons in local units (length 1, x from -0.5 tail to +0.5 front, y down,
# y = 0 on the ground line for ground objects). Each part has a role that picks its colour.

def ellipse(cx, cy, rx, ry, angle=0.0, n=28):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], 1)


def rect(x0, y0, x1, y1):
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], dtype=np.float64)


def poly(*points):
    return np.array(points, dtype=np.float64)


def aeroplane_parts(rng):
    sweep = rng.uniform(0.1, 0.2)
    return [(poly((0.05, -0.02), (-0.12, -0.02), (-0.2 - sweep, -0.3), (-0.1 - sweep, -0.3)), "accent"),
            (ellipse(0, 0, 0.5, rng.uniform(0.06, 0.09)), "body"),
            (poly((-0.5, -0.02), (-0.36, -0.02), (-0.44, -0.26), (-0.52, -0.26)), "accent"),
            (poly((-0.48, 0.01), (-0.38, 0.01), (-0.46, 0.12), (-0.51, 0.12)), "body"),
            (poly((0.1, 0.02), (-0.1, 0.02), (-0.15 - sweep, 0.36), (-0.03 - sweep, 0.36)), "body"),
            (ellipse(0.4, -0.03, 0.05, 0.028), "glass")]


def bird_parts(rng):
    return [(poly((-0.2, 0.0), (-0.5, 0.08), (-0.48, 0.24), (-0.12, 0.14)), "accent"),
            (rect(-0.01, 0.15, 0.02, 0.32), "dark"), (rect(0.07, 0.15, 0.1, 0.32), "dark"),
            (ellipse(0.0, 0.04, 0.28, 0.17, rng.uniform(-0.3, 0.0)), "body"),
            (ellipse(0.26, -0.14, 0.12, 0.12), "body"),
            (poly((0.35, -0.19), (0.5, -0.13), (0.35, -0.09)), "beak"),
            (ellipse(-0.04, 0.01, 0.2, 0.09, -0.2), "accent"),
            (ellipse(0.29, -0.17, 0.025, 0.025), "dark")]


def boat_parts(rng):
    parts = [(poly((-0.5, -0.15), (0.5, -0.2), (0.38, 0.05), (-0.42, 0.05)), "body"),
             (rect(-0.22, -0.3, 0.14, -0.15), "accent"),
             (rect(-0.18, -0.27, -0.1, -0.21), "glass"), (rect(-0.04, -0.27, 0.04, -0.21), "glass")]
    if rng.random() < 0.5:  # sailing boat
        parts += [(rect(-0.015, -0.95, 0.015, -0.3), "dark"),
                  (poly((0.025, -0.9), (0.025, -0.33), (0.38, -0.33)), "light"),
                  (poly((-0.025, -0.85), (-0.025, -0.33), (-0.3, -0.33)), "light")]
    else:  # motor boat: a bigger cabin
        parts += [(rect(-0.3, -0.45, 0.05, -0.3), "accent"), (rect(-0.25, -0.42, 0.0, -0.34), "glass")]
    return parts


def car_parts(rng):
    roof = rng.uniform(0.46, 0.56)
    return [(poly((-0.5, -0.08), (0.5, -0.08), (0.5, -0.28), (0.3, -0.34), (-0.45, -0.34),
                  (-0.5, -0.28)), "body"),
            (poly((-0.32, -0.34), (0.22, -0.34), (0.08, -roof), (-0.24, -roof)), "body"),
            (poly((-0.28, -0.36), (-0.06, -0.36), (-0.06, -roof + 0.03), (-0.22, -roof + 0.03)), "glass"),
            (poly((-0.03, -0.36), (0.17, -0.36), (0.065, -roof + 0.03), (-0.03, -roof + 0.03)), "glass"),
            (rect(-0.5, -0.2, 0.5, -0.17), "accent"),
            (ellipse(-0.3, -0.09, 0.09, 0.09), "dark"), (ellipse(0.3, -0.09, 0.09, 0.09), "dark"),
            (ellipse(-0.3, -0.09, 0.04, 0.04), "light"), (ellipse(0.3, -0.09, 0.04, 0.04), "light")]


def cow_parts(rng):
    legs = [(rect(x, -0.42, x + 0.07, -0.03), "body") for x in (-0.38, -0.27, 0.08, 0.19)]
    hooves = [(rect(x, -0.05, x + 0.07, 0.0), "dark") for x in (-0.38, -0.27, 0.08, 0.19)]
    return legs + hooves + [
        (rect(-0.45, -0.62, -0.42, -0.3), "body"),
        (ellipse(-0.07, -0.52, 0.37, 0.17), "body"),
        (poly((0.2, -0.64), (0.38, -0.68), (0.44, -0.5), (0.26, -0.42)), "body"),
        (ellipse(0.42, -0.56, 0.08, 0.12, 0.4), "body"),
        (ellipse(0.46, -0.47, 0.05, 0.045), "accent"),
        (poly((0.36, -0.66), (0.33, -0.76), (0.4, -0.68)), "light"),
        (poly((0.44, -0.68), (0.47, -0.77), (0.48, -0.66)), "light")]


def train_parts(rng):
    n_windows = int(rng.integers(5, 9))
    span = np.linspace(-0.44, 0.32, n_windows + 1)
    windows = [(rect(a + 0.015, -0.3, b - 0.015, -0.2), "glass") for a, b in zip(span[:-1], span[1:])]
    wheels = [(ellipse(x, -0.04, 0.035, 0.035), "dark") for x in np.linspace(-0.44, 0.42, 8)]
    joints = [(rect(x - 0.006, -0.34, x + 0.006, -0.05), "dark") for x in (-0.15, 0.15)]
    return [(rect(-0.5, -0.34, 0.42, -0.05), "body"),
            (poly((0.42, -0.34), (0.46, -0.34), (0.5, -0.2), (0.5, -0.05), (0.42, -0.05)), "body"),
            (rect(-0.5, -0.37, 0.4, -0.34), "accent"), (rect(-0.5, -0.15, 0.5, -0.11), "accent"),
            (poly((0.44, -0.31), (0.47, -0.3), (0.49, -0.21), (0.44, -0.21)), "glass")] \
        + windows + joints + wheels


def person_parts(rng):
    arm = rng.uniform(-0.25, 0.25)
    return [(rect(-0.11, -0.46, -0.015, -0.02), "accent"), (rect(0.015, -0.46, 0.11, -0.02), "accent"),
            (rect(-0.13, -0.05, -0.01, 0.0), "dark"), (rect(0.01, -0.05, 0.13, 0.0), "dark"),
            (poly((-0.13, -0.8), (0.13, -0.8), (0.12, -0.44), (-0.12, -0.44)), "body"),
            (poly((-0.13, -0.79), (-0.18, -0.79), (-0.24 + arm, -0.45), (-0.19 + arm, -0.45)), "body"),
            (poly((0.13, -0.79), (0.18, -0.79), (0.24 - arm, -0.45), (0.19 - arm, -0.45)), "body"),
            (rect(-0.035, -0.84, 0.035, -0.79), "skin"), (ellipse(0.0, -0.9, 0.07, 0.085), "skin"),
            (ellipse(0.0, -0.95, 0.075, 0.045), "dark")]


def chair_parts(rng):
    lean = rng.uniform(0.0, 0.08)
    return [(rect(-0.3, -0.46, -0.24, 0.0), "body"), (rect(0.24, -0.46, 0.3, 0.0), "body"),
            (rect(-0.2, -0.46, -0.15, -0.04), "accent"), (rect(0.15, -0.46, 0.2, -0.04), "accent"),
            (rect(-0.32, -0.52, 0.32, -0.44), "body"),
            (poly((-0.32, -0.5), (-0.24, -0.5), (-0.24 - lean, -1.0), (-0.32 - lean, -1.0)), "body"),
            (poly((-0.26, -0.62), (-0.2, -0.62), (-0.2 - lean, -0.92), (-0.26 - lean, -0.92)), "accent")]


def tvmonitor_parts(rng):
    return [(rect(-0.2, -0.06, 0.2, 0.0), "dark"), (rect(-0.05, -0.22, 0.05, -0.05), "dark"),
            (rect(-0.5, -0.85, 0.5, -0.2), "body"), (rect(-0.44, -0.79, 0.44, -0.26), "screen")]


OBJECT_PARTS = {"aeroplane": aeroplane_parts, "bird": bird_parts, "boat": boat_parts,
                "car": car_parts, "cow": cow_parts, "train": train_parts, "chair": chair_parts,
                "person": person_parts, "tvmonitor": tvmonitor_parts}
# height above the ground line of the ground objects, in object lengths (tallest variant)
OBJECT_HEIGHT = {"boat": 0.95, "car": 0.56, "cow": 0.77, "train": 0.37, "chair": 1.0, "person": 1.0,
                 "tvmonitor": 0.85}
# object length as a fraction of the image width (trains are often truncated by the border, as in VOC)
OBJECT_LENGTH = {"aeroplane": (0.55, 0.9), "bird": (0.4, 0.6), "boat": (0.5, 0.85),
                 "car": (0.5, 0.85), "cow": (0.5, 0.8), "train": (0.8, 1.4), "chair": (0.5, 0.8),
                 "person": (0.6, 0.9), "tvmonitor": (0.45, 0.75)}


def render_object(rng, parts, h, w, cx, cy, length, flip, angle, cls=None, class_colour_prob=0.0):
    """Draw the parts at (cx, cy), scaled by `length`, mirrored if `flip`, rotated by `angle`.
    With probability `class_colour_prob` the body takes the class's own hue, else a random colour.

    Returns the object mask (h, w) bool and its colours (h, w, 3) float32 (valid under the mask).
    """
    body_col, second = random_object_colour(rng), random_object_colour(rng)
    if class_colour_prob > 0 and rng.random() < class_colour_prob:   # no extra draw at 0: same bytes
        body_col = class_object_colour(rng, cls)
        second = body_col * rng.uniform(0.6, 0.9)
    colours = {"body": random_pattern(rng, h, w, body_col, second),
               "accent": random_pattern(rng, h, w, random_object_colour(rng), body_col),
               "dark": np.full(3, rng.uniform(15, 45), np.float32),
               "light": hsv(rng.random(), rng.uniform(0, 0.15), rng.uniform(0.8, 0.97)),
               "glass": hsv(rng.uniform(0.5, 0.65), rng.uniform(0.1, 0.35), rng.uniform(0.6, 0.85)),
               "beak": hsv(rng.uniform(0.08, 0.15), rng.uniform(0.6, 0.9), rng.uniform(0.7, 0.95)),
               "skin": hsv(rng.uniform(0.03, 0.1), rng.uniform(0.2, 0.6), rng.uniform(0.35, 0.95)),
               "screen": random_pattern(rng, h, w, random_object_colour(rng), random_object_colour(rng))}
    c, s = np.cos(angle), np.sin(angle)
    mask = np.zeros((h, w), bool)
    rgb = np.zeros((h, w, 3), np.float32)
    for points, role in parts:
        x, y = points[:, 0] * (-1 if flip else 1), points[:, 1]
        px, py = cx + length * (c * x - s * y), cy + length * (s * x + c * y)
        canvas = Image.new("L", (w, h), 0)
        ImageDraw.Draw(canvas).polygon(list(zip(px.tolist(), py.tolist())), fill=255)
        part = np.asarray(canvas) > 0
        colour = colours[role]
        rgb[part] = colour[part] if colour.ndim == 3 else colour
        mask |= part
    return mask, rgb


# ----------------------------------------------------------------------------------------------------
# scenes

def horizon_rows(rng, h, w, lo, hi):
    """Per-column row of the horizon: a gently sloped, slightly wavy line between lo*h and hi*h."""
    _, xx = grid(1, w)
    base = rng.uniform(lo, hi) * h
    slope = rng.uniform(-0.08, 0.08) * h / w
    wave = rng.uniform(0, 0.025) * h * np.sin(2 * np.pi * (xx[0] / w * rng.uniform(0.5, 2) + rng.random()))
    return base + slope * (xx[0] - w / 2) + wave


def place_object(rng, h, w, cls, y0, y1):
    """Where the object of `cls` goes when its cue fills rows [y0, y1): a ground object stands on a
    line inside the region, an aeroplane flies in it, a bird perches on a branch in it.

    Returns (class, cx, cy, length, angle) and the anchor (x, y) its cue must pass through (or None).
    """
    lo, hi = OBJECT_LENGTH[cls]
    length = rng.uniform(lo, hi) * w
    span = y1 - y0
    if cls == "bird":   # feet at local y = 0.32, head top at -0.26: 0.6 lengths above the perch
        length = min(length, (span - 0.03 * h) / 0.62)
        cx = rng.uniform(0.35 * length, max(w - 0.35 * length, 0.35 * length))
        perch = rng.uniform(y0 + 0.6 * length, max(y0 + 0.6 * length, y1 - 0.03 * h))
        return (cls, cx, perch - 0.32 * length, length, rng.uniform(-0.15, 0.15)), (cx, perch)
    if cls == "aeroplane":
        cx = rng.uniform(0.35 * length, max(w - 0.35 * length, 0.35 * length))
        cy = rng.uniform(y0 + 0.3 * span, y1 - 0.3 * span)
        return (cls, cx, cy, length, rng.uniform(-0.25, 0.25)), None
    low = 0.6 if y0 == 0 else 0.35   # in a top region, stand low so that tall objects fit
    ground = rng.uniform(y0 + low * span, y1 - 0.03 * h)
    length = min(length, ground / (0.9 * OBJECT_HEIGHT[cls]))   # at most 10 % cut off at the top
    margin = 0.35 * length if cls != "train" else 0.0
    cx = rng.uniform(min(margin, w / 2), max(w - margin, w / 2))
    return (cls, cx, ground, length, 0.0), (cx, ground)


def draw_scene(rng, h, w, top_class, bottom_class, top_cue, bottom_cue, with_objects, void_width,
               class_colour_prob=0.0, stuff=None, cue_reach=0.0):
    """One image whose top / bottom region belongs to `top_class` / `bottom_class` (None: generic
    stuff; a class whose cue flag is False also gets generic stuff; a cue flag naming a cue class paints
    that class's cue, a foreign one). Returns rgb uint8 (h, w, 3),
    label (h, w) uint8 with the void band, cue map (h, w) uint8 and [(class name, visible mask)].

    `stuff` = (top kind, bottom kind), each a key of CUE_PAINTERS or "generic", paints the regions
    whatever their classes (toy/toynet.py: objects on unrelated backgrounds); the cue map is then 0.
    `cue_reach` > 0 keeps a cue only within that fraction of the long side from an object (where the object
    is, or would be in an image without objects); farther cue pixels show generic stuff."""
    # a top region holding a standing or perching object, or a bottom one holding a bird, needs room
    room_top = top_class is not None and top_class != "aeroplane"
    room_bottom = bottom_class == "bird"
    lo, hi = {(False, False): (0.4, 0.6), (True, False): (0.55, 0.68), (False, True): (0.32, 0.45),
              (True, True): (0.45, 0.55)}[(room_top, room_bottom)]
    horizon = horizon_rows(rng, h, w, lo, hi)
    yy, _ = grid(h, w)
    top_region = yy < horizon[None, :]
    y_h = float(horizon.mean())
    placed, anchors = [], {"top": [], "bottom": []}
    for cls, key, (y0, y1) in ((bottom_class, "bottom", (y_h, h)), (top_class, "top", (0.0, y_h))):
        if cls is not None:
            where, anchor = place_object(rng, h, w, cls, y0, y1)
            placed.append(where)
            anchors[key] += [anchor] if anchor is not None else []

    cue_map = np.zeros((h, w), np.uint8)
    img = np.zeros((h, w, 3), np.float32)
    for index, (region, cls, cue, key) in enumerate(((top_region, top_class, top_cue, "top"),
                                                     (~top_region, bottom_class, bottom_cue, "bottom"))):
        if stuff is not None:
            painter = CUE_PAINTERS.get(stuff[index], paint_generic)
            img[region] = painter(rng, h, w, anchors[key])[region]
        elif isinstance(cue, str) or (cls in CUE_OF and cue):
            cue_class = cue if isinstance(cue, str) else cls   # a foreign cue, or the class's own
            img[region] = CUE_PAINTERS[CUE_OF[cue_class]](rng, h, w, anchors[key])[region]
            cue_map[region] = CAT_LIST.index(cue_class) + 1
        else:
            img[region] = paint_generic(rng, h, w)[region]

    objects = []
    if with_objects:
        owner = np.full((h, w), -1, np.int32)   # which object is visible at each pixel
        for index, (cls, cx, cy, length, angle) in enumerate(placed):
            mask, rgb = render_object(rng, OBJECT_PARTS[cls](rng), h, w, cx, cy, length,
                                      bool(rng.random() < 0.5), angle, cls, class_colour_prob)
            img[mask] = rgb[mask]
            owner[mask] = index
        for index, (cls, *_unused) in enumerate(placed):
            objects.append((cls, owner == index))
    if cue_reach > 0:   # no extra draw at 0: same bytes
        near = [m for _, m in objects] or [render_object(rng, OBJECT_PARTS[cls](rng), h, w, cx, cy, length,
                                                         False, angle)[0]
                                           for cls, cx, cy, length, angle in placed]
        far_cue = (cue_map > 0) & (distance_from(near, (h, w)) > cue_reach * max(h, w))
        img[far_cue] = paint_generic(rng, h, w)[far_cue]
        cue_map[far_cue] = 0
    label = np.zeros((h, w), np.uint8)
    for cls, mask in objects:
        label[mask] = CAT_LIST.index(cls) + 1
        cue_map[mask] = 0
    label[void_band([m for _, m in objects], void_width)] = 255

    img += rng.normal(0, PIXEL_NOISE_STD, img.shape).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), label, cue_map, objects


def distance_from(masks, shape):
    """Euclidean distance (pixels) of every pixel to the nearest pixel of any mask (inf without one)."""
    union = np.any(masks, axis=0) if masks else None
    if union is None or not union.any():
        return np.full(shape, np.inf)
    return ndimage.distance_transform_edt(~union)


def void_band(masks, half_width):
    """Pixels within `half_width` of any object outline (inside or outside), as VOC marks them void."""
    band = np.zeros(masks[0].shape if masks else (0, 0), bool)
    if half_width <= 0:
        return band
    structure = ndimage.generate_binary_structure(2, 2)
    for mask in masks:
        if mask.any():
            grown = ndimage.binary_dilation(mask, structure, iterations=half_width)
            shrunk = ndimage.binary_erosion(mask, structure, iterations=half_width, border_value=1)
            band |= grown & ~shrunk
    return band


# ----------------------------------------------------------------------------------------------------
# plans: which classes and cues each image gets (decided up front, balanced over classes)

def image_size(rng, long_min, long_max, portrait_prob=0.2):
    """(h, w) with the long side in [long_min, long_max] and a VOC-like aspect of 0.65-0.85."""
    long_side = int(rng.integers(long_min, long_max + 1))
    short_side = int(round(long_side * rng.uniform(0.65, 0.85)))
    return (long_side, short_side) if rng.random() < portrait_prob else (short_side, long_side)


def plan_id_images(seed, n, two_class_prob, cue_drop_prob, swap_prob, foreign_cue_prob=0.0):
    """For each ID image: (top-region class or None, bottom-region class or None, top cue, bottom cue).
    A cue entry is True (the region shows its class's cue), False (generic stuff) or the name of a cue
    class that is not in the image (the region shows that class's cue: a "foreign" cue).

    The first class cycles through the nine classes in a shuffled order so that every split holds
    every class; with `two_class_prob` the other region gets a class too (a cue class: a top class
    for a bottom or distractor one, a bottom one for a top one). Distractors stand in the bottom
    region on generic stuff. A one-class image of a cue class always shows its cue; an image with
    two cue classes loses one of its two cues (generic stuff instead) with `cue_drop_prob`. So an
    object is sometimes seen without its cue, but all-generic pictures carry only distractor labels:
    were they labelled with cue classes, the classifier would learn "no cue -> some cue class" and
    fire on the easy OoD candidates. Classes sit in their natural region (sky on top, water below)
    except that with `swap_prob` the two regions trade places: otherwise "generic stuff below" would
    itself be evidence of a top class. With `foreign_cue_prob`, each region that would show generic stuff
    shows instead the cue of a cue class of that region (top: sky, tree; bottom: water, road, grass,
    rails) that is not in the image: a person on grass, a chair under a sky. At 0 (the default) no draw
    is made, so the plans are those of earlier versions.
    """
    rng = np.random.default_rng([seed, STREAM_PLAN])
    plans = []
    order = []
    for _ in range(n):
        if not order:
            order = list(rng.permutation(len(TOY_CLASSES)))
        first = TOY_CLASSES[order.pop()]
        top = first if first in TOP_CLASSES else None
        bottom = first if top is None else None
        if rng.random() < two_class_prob:
            if top is None:
                top = TOP_CLASSES[rng.integers(len(TOP_CLASSES))]
            else:
                bottom = BOTTOM_CLASSES[rng.integers(len(BOTTOM_CLASSES))]
        top_cue = bottom_cue = True
        if top in CUE_CLASSES and bottom in CUE_CLASSES and rng.random() < cue_drop_prob:
            if rng.random() < 0.5:
                top_cue = False
            else:
                bottom_cue = False
        if foreign_cue_prob > 0:
            present = {top, bottom}
            if not (top in CUE_CLASSES and top_cue) and rng.random() < foreign_cue_prob:
                top_cue = str(rng.choice([c for c in TOP_CLASSES if c not in present]))
            if not (bottom in CUE_CLASSES and bottom_cue) and rng.random() < foreign_cue_prob:
                bottom_cue = str(rng.choice([c for c in BOTTOM_CLASSES if c not in present]))
        if rng.random() < swap_prob:
            top, bottom, top_cue, bottom_cue = bottom, top, bottom_cue, top_cue
        plans.append((top, bottom, top_cue, bottom_cue))
    return plans


def draw_visible_scene(rng, h, w, *args, **kwargs):
    """draw_scene(rng, h, w, *args, **kwargs) again (same generator, so deterministic) until every object
    keeps MIN_VISIBLE_OBJECT_PIXELS of the image after occlusion."""
    while True:
        scene = draw_scene(rng, h, w, *args, **kwargs)
        if all(m.sum() >= MIN_VISIBLE_OBJECT_PIXELS * h * w for _, m in scene[3]):
            return scene


def draw_id_image(seed, index, plan, args):
    """Draw ID image `index` with its own generator; retry when an object is occluded away."""
    top, bottom, top_cue, bottom_cue = plan
    rng = np.random.default_rng([seed, STREAM_ID, index])
    h, w = image_size(rng, args.long_min, args.long_max)
    return draw_visible_scene(rng, h, w, top, bottom, top_cue, bottom_cue, True, args.void_width,
                              args.class_colour_prob, cue_reach=args.cue_reach)


def draw_ood_image(seed, index, cue_class, args):
    """A candidate with the cue of `cue_class` (hard) or generic stuff only (None, easy); no object.
    The cue region is swapped with the same probability as in the ID images."""
    rng = np.random.default_rng([seed, STREAM_OOD, index])
    h, w = image_size(rng, args.long_min, args.long_max)
    top = cue_class if cue_class in TOP_CLASSES else None
    bottom = cue_class if cue_class in BOTTOM_CLASSES else None
    if rng.random() < args.swap_prob:
        top, bottom = bottom, top
    rgb, _, cue, _ = draw_scene(rng, h, w, top, bottom, True, True, False, args.void_width,
                                cue_reach=args.cue_reach)
    return rgb, cue


# ----------------------------------------------------------------------------------------------------
# writers

def annotation_xml(img_id, h, w, objects):
    """VOC XML: filename, size, one <object> per instance with its (1-based, inclusive) box."""
    lines = ["<annotation>", "\t<folder>VOC2012</folder>", f"\t<filename>{img_id}.jpg</filename>",
             "\t<source><database>ToyVOC (synthetic)</database></source>",
             f"\t<size><width>{w}</width><height>{h}</height><depth>3</depth></size>",
             "\t<segmented>1</segmented>"]
    for cls, mask in objects:
        ys, xs = np.nonzero(mask)
        truncated = int(ys.min() == 0 or xs.min() == 0 or ys.max() == h - 1 or xs.max() == w - 1)
        lines += ["\t<object>", f"\t\t<name>{cls}</name>", "\t\t<pose>Unspecified</pose>",
                  f"\t\t<truncated>{truncated}</truncated>", "\t\t<difficult>0</difficult>",
                  f"\t\t<bndbox><xmin>{xs.min() + 1}</xmin><ymin>{ys.min() + 1}</ymin>"
                  f"<xmax>{xs.max() + 1}</xmax><ymax>{ys.max() + 1}</ymax></bndbox>", "\t</object>"]
    return "\n".join(lines + ["</annotation>"]) + "\n"


def save_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def save_jpeg(path, rgb):
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="JPEG", quality=JPEG_QUALITY)


def save_ood_image(path, rgb, mode):
    """Write a candidate as an RGB or grayscale JPEG, or as a palette PNG (256 colours)."""
    img = Image.fromarray(rgb)
    with atomic_path(path) as tmp:
        if mode == "L":
            img.convert("L").save(tmp, format="JPEG", quality=JPEG_QUALITY)
        elif mode == "P":
            img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE) \
                .save(tmp, format="PNG")
        else:
            img.save(tmp, format="JPEG", quality=JPEG_QUALITY)


def ood_mode(index, hard, args):
    """Image mode of candidate `index`: some easy ones are grayscale, one of each kind is a palette PNG."""
    if index == 0:
        return "P"
    if not hard and args.gray_every > 0 and index % args.gray_every == 1:
        return "L"
    return "RGB"


MARKER = "toyvoc.json"
OOD_MARKER = "manifest.json"
OWNED_DIRS = ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationObject", "SegmentationClassAug",
              "CueMasks", os.path.join("ImageSets", "Segmentation"))


def check_output_dir(path, marker):
    """Only write into an empty folder or one this tool made (it has `marker`)."""
    if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(os.path.join(path, marker)):
        raise InputError(f"{path} exists, is not empty and has no {marker}: it was not made by "
                         f"toy.toyvoc. Pass an empty or new folder.")


def remove_stale(folder, keep):
    """Delete files of an earlier, larger generation that this run did not write."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if name not in keep and os.path.isfile(path):
                os.remove(path)


def split_ids(args):
    """(all ids, train_aug ids, train ids, val ids) in id order."""
    n_all = args.n_train_aug + args.n_val
    ids = [f"2007_{i + 1:06d}" for i in range(n_all)]
    train_aug, val = ids[:args.n_train_aug], ids[args.n_train_aug:]
    return ids, train_aug, train_aug[:args.n_train], val


def validate(args):
    if args.n_train_aug < 1 or args.n_val < 1:
        raise InputError("--n_train_aug and --n_val must be at least 1")
    if not 1 <= args.n_train <= args.n_train_aug:
        raise InputError(f"--n_train must be between 1 and --n_train_aug ({args.n_train_aug}), "
                         f"got {args.n_train}")
    if not 32 <= args.long_min <= args.long_max:
        raise InputError(f"need 32 <= --long_min <= --long_max, got {args.long_min}, {args.long_max}")
    if args.cue_reach < 0:
        raise InputError(f"--cue_reach must be at least 0, got {args.cue_reach}")
    if not all(0 <= p <= 1 for p in (args.cue_drop_prob, args.two_class_prob, args.swap_prob,
                                     args.class_colour_prob, args.foreign_cue_prob)):
        raise InputError("--cue_drop_prob, --two_class_prob, --swap_prob, --class_colour_prob and "
                         "--foreign_cue_prob are probabilities in [0, 1]")
    if args.n_ood_hard < 0 or args.n_ood_easy < 0:
        raise InputError("--n_ood_hard and --n_ood_easy must be >= 0")


def object_map(label, objects):
    """VOC's SegmentationObject map of an image: object k (1-based, in drawing order) on its visible pixels,
    background 0, 255 where the class label is void (the outline band), so both PNGs agree pixel for pixel."""
    out = np.zeros(label.shape, np.uint8)
    for number, (_, mask) in enumerate(objects, 1):
        out[mask] = number
    out[label == 255] = 255
    return out


def write_id_set(args):
    ids, train_aug, train, val = split_ids(args)
    evaluated = set(train) | set(val)
    plans = plan_id_images(args.seed, len(ids), args.two_class_prob, args.cue_drop_prob, args.swap_prob,
                           args.foreign_cue_prob)
    palette = palette_voc()
    # distractors never have a cue; foreign_cue: images showing the class's cue without the class
    counts = {c: {"images": 0, "with_cue": 0, "foreign_cue": 0} for c in TOY_CLASSES}
    out = args.out
    for index, (img_id, plan) in enumerate(zip(ids, plans)):
        rgb, label, cue, objects = draw_id_image(args.seed, index, plan, args)
        h, w = label.shape
        save_jpeg(os.path.join(out, "JPEGImages", img_id + ".jpg"), rgb)
        save_text(os.path.join(out, "Annotations", img_id + ".xml"), annotation_xml(img_id, h, w, objects))
        save_png(os.path.join(out, "SegmentationClassAug", img_id + ".png"), label)
        if img_id in evaluated:
            save_png(os.path.join(out, "SegmentationClass", img_id + ".png"), label, palette=palette)
            save_png(os.path.join(out, "SegmentationObject", img_id + ".png"), object_map(label, objects),
                     palette=palette)
        save_png(os.path.join(out, "CueMasks", img_id + ".png"), cue)
        top, bottom, top_cue, bottom_cue = plan
        for cls, has_cue in ((top, top_cue), (bottom, bottom_cue)):
            if cls is not None:
                counts[cls]["images"] += 1
                counts[cls]["with_cue"] += int(has_cue is True and cls in CUE_OF)
        for has_cue in (top_cue, bottom_cue):
            if isinstance(has_cue, str):
                counts[has_cue]["foreign_cue"] += 1
    lists = os.path.join(out, "ImageSets", "Segmentation")
    for name, members in (("train", train), ("val", val), ("trainval", train + val)):
        save_text(os.path.join(lists, name + ".txt"), "".join(i + "\n" for i in members))
    for folder, ext, members in (("JPEGImages", ".jpg", ids), ("Annotations", ".xml", ids),
                                 ("SegmentationClassAug", ".png", ids), ("CueMasks", ".png", ids),
                                 ("SegmentationClass", ".png", train + val),
                                 ("SegmentationObject", ".png", train + val)):
        remove_stale(os.path.join(out, folder), {i + ext for i in members})
    return {"n_train_aug": len(train_aug), "n_train": len(train), "n_val": len(val),
            "class_counts": counts}


def write_ood_set(args):
    """Hard candidates cycle through the six cues; easy ones are generic stuff."""
    entries = []
    for index in range(args.n_ood_hard + args.n_ood_easy):
        hard = index < args.n_ood_hard
        cue_class = CUE_CLASSES[index % len(CUE_CLASSES)] if hard else None
        rgb, cue = draw_ood_image(args.seed, index, cue_class, args)
        mode = ood_mode(index if hard else index - args.n_ood_hard, hard, args)
        name = f"ood_{index + 1:04d}"
        rel = f"images/{name}" + (".png" if mode == "P" else ".jpg")
        save_ood_image(os.path.join(args.ood_out, rel), rgb, mode)
        save_png(os.path.join(args.ood_out, "CueMasks", name + ".png"), cue)
        entries.append({"path": rel, "hard": hard, "cue": cue_class,
                        "cue_kind": CUE_OF[cue_class] if hard else None, "mode": mode,
                        "cue_mask": f"CueMasks/{name}.png"})
    save_text(os.path.join(args.ood_out, "candidates.txt"), "".join(e["path"] + "\n" for e in entries))
    remove_stale(os.path.join(args.ood_out, "images"), {os.path.basename(e["path"]) for e in entries})
    remove_stale(os.path.join(args.ood_out, "CueMasks"), {os.path.basename(e["cue_mask"]) for e in entries})
    save_json(os.path.join(args.ood_out, OOD_MARKER), entries)
    return {"n_hard": args.n_ood_hard, "n_easy": args.n_ood_easy}


def parameters(args):
    return {k: getattr(args, k) for k in ("seed", "n_train_aug", "n_train", "n_val", "n_ood_hard",
                                          "n_ood_easy", "long_min", "long_max", "cue_drop_prob",
                                          "two_class_prob", "swap_prob", "void_width", "gray_every",
                                          "class_colour_prob", "foreign_cue_prob", "cue_reach")}


def run(args):
    """Generate the ID set into args.out and the OoD candidates into args.ood_out."""
    validate(args)
    check_output_dir(args.out, MARKER)
    check_output_dir(args.ood_out, OOD_MARKER)
    info = {"generator": "toy.toyvoc", "parameters": parameters(args), "complete": False,
            "classes": list(TOY_CLASSES), "cue_of": CUE_OF, "distractors": list(DISTRACTOR_CLASSES)}
    save_json(os.path.join(args.out, MARKER), info)   # marks the folder as ours before writing
    info.update(write_id_set(args))
    info["ood"] = write_ood_set(args)
    info["complete"] = True
    save_json(os.path.join(args.out, MARKER), info)
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="Data/ToyVOC", help="VOC-layout output folder (voc12_root)")
    p.add_argument("--ood_out", default="WOoD_dataset/toy", help="OoD candidate pool folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_train_aug", type=int, default=360, help="train_aug images (train is a prefix)")
    p.add_argument("--n_train", type=int, default=120, help="train images (evaluated, palette GT)")
    p.add_argument("--n_val", type=int, default=50)
    p.add_argument("--n_ood_hard", type=int, default=120, help="cue-only candidates (cycling the cues)")
    p.add_argument("--n_ood_easy", type=int, default=120, help="generic-stuff candidates")
    p.add_argument("--long_min", type=int, default=128, help="smallest long image side")
    p.add_argument("--long_max", type=int, default=160, help="largest long image side")
    p.add_argument("--cue_drop_prob", type=float, default=0.35,
                   help="P(a two-class image shows only one of its two cues); one-class images always "
                        "show theirs (defaults: the cue is with its class about 92 %% of the time)")
    p.add_argument("--two_class_prob", type=float, default=0.3, help="P(second class in the image)")
    p.add_argument("--swap_prob", type=float, default=0.5,
                   help="P(top and bottom regions trade places), so that stuff position is no evidence")
    p.add_argument("--class_colour_prob", type=float, default=0.0,
                   help="P(an object's body takes its class's own hue instead of a random colour)")
    p.add_argument("--foreign_cue_prob", type=float, default=0.0,
                   help="P(a region that would show generic stuff shows the cue of an absent class)")
    p.add_argument("--cue_reach", type=float, default=0.15,
                   help="a cue shows only within this fraction of the long side from an object (in a hard OoD "
                        "image: from where its object would be), generic stuff beyond; 0: the whole region")
    p.add_argument("--void_width", type=int, default=1, help="void pixels on each side of an outline")
    p.add_argument("--gray_every", type=int, default=8, help="every n-th easy candidate is grayscale")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    try:
        info = run(args)
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"ToyVOC: {info['n_train_aug']} train_aug ({info['n_train']} train), {info['n_val']} val -> "
          f"{args.out}; {info['ood']['n_hard']} hard + {info['ood']['n_easy']} easy OoD -> "
          f"{args.ood_out}; {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
