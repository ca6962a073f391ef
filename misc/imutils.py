"""Image preprocessing of docs/method.md §1.2, as IRN's misc/imutils.py does it (same sizes, same crop boxes).

Conventions:
- Images are HWC `uint8` until `normalize`, which returns HWC `float32`; label maps are 2-D `uint8`.
- `rescale` resizes with PIL like the original (which resizes the uint8 image *before* normalising).
  `uint8` arrays (2-D, or HWC with 3 or 4 channels) go through PIL directly. Other arrays (e.g. float
  maps) are resized channel by channel in PIL mode "F" (float32; bicubic there is not clipped to
  0..255, unlike the 8-bit path) and come back as float32; integer label maps with `order=0` go
  through mode "I" and keep their dtype.
- Randomness comes from numpy's global RNG (`np.random`); torch's DataLoader seeds it per worker.
  (IRN draws from Python's `random`; the distributions are the same.)
- Functions that take an optional `label` return `img` alone when `label is None`, else `(img, label)`.
"""
import numpy as np
from PIL import Image, ImageOps

from misc.utils import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {3: Image.Resampling.BICUBIC, 0: Image.Resampling.NEAREST}


def read_rgb(path):
    """Read any image file as RGB uint8 (H, W, 3): grayscale, palette, RGBA, CMYK... become RGB.

    A JPEG's EXIF orientation is applied, as the original's reader (imageio 2's legacy JPEG-PIL format,
    `exifrotate=True`) did; VOC's JPEGs carry no orientation tag, so their label maps stay aligned.
    """
    try:
        with Image.open(path) as opened:
            img = ImageOps.exif_transpose(opened) if opened.format == "JPEG" else opened
            img.load()
            if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                # 16-bit grayscale: PIL's convert("RGB") would clip at 255; scale to 8 bits instead
                arr = np.asarray(img).astype(np.float64)
                if arr.max(initial=0) > 255:
                    arr = arr / 257.0
                gray = np.clip(np.round(arr), 0, 255).astype(np.uint8)
                return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
            rgb = img.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise InputError(f"missing image file {path}") from None
    except Exception as e:  # unidentified format, truncated data, unsupported mode...
        raise InputError(f"cannot read image {path} ({type(e).__name__}: {e}); the file is corrupt or "
                         f"not an image: replace or remove it from the list") from None


def normalize(img, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """float32 (x/255 - mean) / std per channel of an HWC image (computed in float64 like IRN)."""
    arr = np.asarray(img)
    out = (arr / 255.0 - np.asarray(mean, dtype=np.float64)) / np.asarray(std, dtype=np.float64)
    return out.astype(np.float32)


def scaled_size(height, width, scale):
    """(round(H*s), round(W*s)) with numpy's round-half-to-even; at least 1 (the original crashes there)."""
    return max(1, int(np.round(height * scale))), max(1, int(np.round(width * scale)))


def resize(img, size, order):
    """PIL resize to `size` = (h, w); bicubic for order 3, nearest for order 0; same size -> unchanged."""
    img = np.asarray(img)
    if tuple(size) == img.shape[:2]:
        return img
    if order not in _RESAMPLE:
        raise ValueError(f"order must be 3 (bicubic) or 0 (nearest), got {order}")
    resample = _RESAMPLE[order]
    pil_size = (int(size[1]), int(size[0]))
    if img.dtype == np.uint8 and (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (3, 4))):
        return np.asarray(Image.fromarray(img).resize(pil_size, resample))
    channels = img[:, :, None] if img.ndim == 2 else img
    if img.dtype == np.uint8:  # e.g. (H, W, 1) or many channels: 8-bit planes, as the RGB path
        mode_dtype, out_dtype = np.uint8, np.uint8
    elif np.issubdtype(img.dtype, np.floating):
        mode_dtype, out_dtype = np.float32, np.float32
    elif np.issubdtype(img.dtype, np.integer) and order == 0:
        mode_dtype, out_dtype = np.int32, img.dtype
    else:
        raise TypeError(f"cannot resize a {img.dtype} array with order {order}: bicubic needs uint8 or float")
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(channels[:, :, c], dtype=mode_dtype))
                         .resize(pil_size, resample)) for c in range(channels.shape[2])]
    out = np.stack(planes, axis=2).astype(out_dtype)
    return out[:, :, 0] if img.ndim == 2 else out


def rescale(img, scale, order):
    """Resize by `scale` to (round(H*s), round(W*s)) (half to even); a no-op when the size is unchanged."""
    img = np.asarray(img)
    return resize(img, scaled_size(img.shape[0], img.shape[1], scale), order)


def random_resize_long(img, lo, hi):
    """Draw an integer L in [lo, hi] (inclusive) and rescale (bicubic) so that the long side becomes L."""
    target_long = np.random.randint(lo, hi + 1)
    height, width = np.asarray(img).shape[:2]
    scale = target_long / height if width < height else target_long / width
    return rescale(img, scale, 3)


def random_scale(img, label, scale_range):
    """Rescale the image (bicubic) and the label (nearest, if given) by one s ~ U(lo, hi)."""
    lo, hi = scale_range
    scale = lo + np.random.random() * (hi - lo)
    img = rescale(img, scale, 3)
    if label is None:
        return img
    return img, rescale(label, scale, 0)


def random_flip(img, label=None):
    """Horizontal flip with probability 1/2, of the image and the label together."""
    if np.random.randint(2):
        img = np.fliplr(img)
        label = None if label is None else np.fliplr(label)
    return img if label is None else (img, label)


def random_crop_box(height, width, size):
    """IRN's random crop box: (canvas top, canvas left, image top, image left, crop h, crop w).

    Per axis: if the image is larger than `size`, the canvas offset is 0 and the image offset is
    uniform in [0, extent - size]; otherwise the image offset is 0 and the canvas offset is uniform
    in [0, size - extent]. Width is drawn before height (IRN's order).
    """
    crop_h, crop_w = min(size, height), min(size, width)
    w_space, h_space = width - size, height - size
    if w_space > 0:
        canvas_left, img_left = 0, np.random.randint(0, w_space + 1)
    else:
        canvas_left, img_left = np.random.randint(0, -w_space + 1), 0
    if h_space > 0:
        canvas_top, img_top = 0, np.random.randint(0, h_space + 1)
    else:
        canvas_top, img_top = np.random.randint(0, -h_space + 1), 0
    return canvas_top, canvas_left, img_top, img_left, crop_h, crop_w


def _paste(img, box, size, fill):
    canvas_top, canvas_left, img_top, img_left, crop_h, crop_w = box
    img = np.asarray(img)
    canvas = np.full((size, size) + img.shape[2:], fill, dtype=img.dtype)
    canvas[canvas_top:canvas_top + crop_h, canvas_left:canvas_left + crop_w] = \
        img[img_top:img_top + crop_h, img_left:img_left + crop_w]
    return canvas


def random_crop(img, label, size, fills=(0, 255)):
    """A size x size crop (padding with fills[0] for the image, fills[1] for the label); one box for both."""
    height, width = np.asarray(img).shape[:2]
    box = random_crop_box(height, width, size)
    img = _paste(img, box, size, fills[0])
    if label is None:
        return img
    return img, _paste(label, box, size, fills[1])


def top_left_crop(img, size, fill):
    """A size x size canvas filled with `fill`, with the image's top-left corner at the canvas's."""
    height, width = np.asarray(img).shape[:2]
    return _paste(img, (0, 0, 0, 0, min(size, height), min(size, width)), size, fill)


def hwc_to_chw(img):
    return np.ascontiguousarray(np.transpose(img, (2, 0, 1)))


def resize_bilinear(image, size):
    """(H, W, C) float32 to `size` = (h, w), bilinear with half-pixel centres and no anti-aliasing: cv2's
    INTER_LINEAR rule (torch computes it in float32; cv2 rounds its weights to 11 bits, a ~1e-3 difference)."""
    import torch  # imported here: the other image ops need no torch
    import torch.nn.functional as F
    if tuple(size) == image.shape[:2]:
        return image
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    out = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


def resize_label_nearest(label, size):
    """(H, W) label map to `size` = (h, w) with PIL nearest."""
    return np.asarray(Image.fromarray(np.asarray(label, dtype=np.uint8)).resize((size[1], size[0]),
                                                                                Image.Resampling.NEAREST))
