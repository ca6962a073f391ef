import numpy as np
import pytest
from PIL import Image

from misc import imutils
from misc.utils import InputError


def _rand_img(h, w, seed=0):
    return np.random.RandomState(seed).randint(0, 256, size=(h, w, 3)).astype(np.uint8)


def test_normalize_values_and_dtype():
    img = np.array([[[0, 128, 255]]], dtype=np.uint8)
    out = imutils.normalize(img)
    assert out.dtype == np.float32 and out.shape == (1, 1, 3)
    expected = [(0 / 255 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (255 / 255 - 0.406) / 0.225]
    np.testing.assert_array_equal(out[0, 0], np.array(expected, dtype=np.float32))


@pytest.mark.parametrize("h, w, s, expected", [
    (5, 7, 0.5, (2, 4)),      # 2.5 -> 2, 3.5 -> 4: half to even
    (7, 5, 0.5, (4, 2)),
    (9, 11, 0.5, (4, 6)),     # 4.5 -> 4, 5.5 -> 6
    (10, 10, 1.5, (15, 15)),
    (3, 3, 0.25, (1, 1)),     # 0.75 -> 1
])
def test_rescale_rounds_half_to_even(h, w, s, expected):
    img = _rand_img(h, w)
    assert imutils.rescale(img, s, 3).shape == expected + (3,)
    label = img[:, :, 0]
    assert imutils.rescale(label, s, 0).shape == expected


def test_rescale_same_size_is_noop():
    img = _rand_img(10, 12)
    assert imutils.rescale(img, 1.0, 3) is img
    assert imutils.rescale(img, 1.04, 3) is img  # round(10.4)=10, round(12.48)=12


def test_rescale_matches_pil_bicubic_and_nearest():
    img = _rand_img(20, 30)
    out = imutils.rescale(img, 0.5, 3)
    ref = np.asarray(Image.fromarray(img).resize((15, 10), Image.BICUBIC))
    np.testing.assert_array_equal(out, ref)
    label = np.random.RandomState(1).randint(0, 21, size=(20, 30)).astype(np.uint8)
    up = imutils.rescale(label, 2.0, 0)
    # nearest upsampling by 2 repeats every pixel
    np.testing.assert_array_equal(up, label.repeat(2, 0).repeat(2, 1))
    assert up.dtype == np.uint8


def test_rescale_float_per_channel_mode_f():
    img = np.random.RandomState(2).rand(8, 6, 2).astype(np.float32) * 3 - 1
    out = imutils.rescale(img, 0.5, 3)
    assert out.shape == (4, 3, 2) and out.dtype == np.float32
    ref = np.asarray(Image.fromarray(img[:, :, 1], mode="F").resize((3, 4), Image.BICUBIC))
    np.testing.assert_array_equal(out[:, :, 1], ref)


def test_rescale_uint8_planes_equal_rgb_path():
    img = _rand_img(9, 13)
    both = np.concatenate([img, img[:, :, :2]], axis=2)   # 5 channels: resized plane by plane
    out = imutils.rescale(both, 0.7, 3)
    np.testing.assert_array_equal(out[:, :, :3], imutils.rescale(img, 0.7, 3))
    np.testing.assert_array_equal(out[:, :, 3:], out[:, :, :2])
    labels = np.arange(117, dtype=np.int64).reshape(9, 13)
    np.testing.assert_array_equal(imutils.rescale(labels, 2.0, 0), labels.repeat(2, 0).repeat(2, 1))
    with pytest.raises(TypeError):
        imutils.rescale(labels, 0.5, 3)


def test_random_resize_long_sets_long_side():
    img = _rand_img(30, 40)   # landscape: long side is the width
    np.random.seed(3)
    target = np.random.randint(50, 61)
    np.random.seed(3)
    out = imutils.random_resize_long(img, 50, 60)
    assert out.shape == (int(np.round(30 * target / 40)), target, 3)
    portrait = _rand_img(40, 30)
    out = imutils.random_resize_long(portrait, 20, 20)
    assert out.shape == (20, 15, 3)
    square = _rand_img(30, 30)  # W == H: scale by the width, as IRN
    assert imutils.random_resize_long(square, 45, 45).shape == (45, 45, 3)


def test_random_scale_same_scale_for_image_and_label():
    img = _rand_img(20, 40)
    label = np.arange(800, dtype=np.uint8).reshape(20, 40) % 21
    np.random.seed(4)
    s = 0.5 + np.random.random() * 1.0
    np.random.seed(4)
    out_img, out_label = imutils.random_scale(img, label, (0.5, 1.5))
    size = (int(np.round(20 * s)), int(np.round(40 * s)))
    assert out_img.shape[:2] == size and out_label.shape == size
    np.testing.assert_array_equal(out_label, imutils.rescale(label, s, 0))
    np.testing.assert_array_equal(out_img, imutils.rescale(img, s, 3))
    np.random.seed(4)
    assert imutils.random_scale(img, None, (0.5, 1.5)).shape == size + (3,)


def test_random_flip_flips_both_or_neither():
    img = _rand_img(4, 6)
    label = img[:, :, 1].copy()
    flips = 0
    np.random.seed(5)
    for _ in range(20):
        out_img, out_label = imutils.random_flip(img, label)
        flipped = np.array_equal(out_img, img[:, ::-1])
        assert flipped or np.array_equal(out_img, img)
        np.testing.assert_array_equal(out_label, out_img[:, :, 1])
        flips += flipped
    assert 0 < flips < 20
    assert imutils.random_flip(img).shape == img.shape


def test_random_crop_image_bigger_than_crop():
    img = _rand_img(10, 12).astype(np.float32)
    label = img[:, :, 0].astype(np.uint8)
    np.random.seed(6)
    left = np.random.randint(0, 12 - 8 + 1)   # width first, as IRN
    top = np.random.randint(0, 10 - 8 + 1)
    np.random.seed(6)
    out_img, out_label = imutils.random_crop(img, label, 8, (0, 255))
    np.testing.assert_array_equal(out_img, img[top:top + 8, left:left + 8])
    np.testing.assert_array_equal(out_label, label[top:top + 8, left:left + 8])
    assert out_img.dtype == np.float32 and out_label.dtype == np.uint8


def test_random_crop_image_smaller_than_crop_pads_with_fills():
    img = _rand_img(5, 7).astype(np.float32) + 1  # no zero pixel, so padding is visible
    label = np.full((5, 7), 3, dtype=np.uint8)
    np.random.seed(7)
    canvas_left = np.random.randint(0, 10 - 7 + 1)
    canvas_top = np.random.randint(0, 10 - 5 + 1)
    np.random.seed(7)
    out_img, out_label = imutils.random_crop(img, label, 10, (0, 255))
    expected_img = np.zeros((10, 10, 3), np.float32)
    expected_img[canvas_top:canvas_top + 5, canvas_left:canvas_left + 7] = img
    expected_label = np.full((10, 10), 255, np.uint8)
    expected_label[canvas_top:canvas_top + 5, canvas_left:canvas_left + 7] = 3
    np.testing.assert_array_equal(out_img, expected_img)
    np.testing.assert_array_equal(out_label, expected_label)


def test_random_crop_mixed_axes_and_offsets_cover_range():
    img = _rand_img(4, 12)   # wider than 8, shorter than 8
    seen_left, seen_top = set(), set()
    np.random.seed(8)
    for _ in range(200):
        state = np.random.get_state()
        left = np.random.randint(0, 12 - 8 + 1)
        top = np.random.randint(0, 8 - 4 + 1)
        np.random.set_state(state)
        out = imutils.random_crop(img, None, 8, (0, 255))
        expected = np.zeros((8, 8, 3), np.uint8)
        expected[top:top + 4] = img[:, left:left + 8]
        np.testing.assert_array_equal(out, expected)
        seen_left.add(left)
        seen_top.add(top)
    assert seen_left == set(range(5)) and seen_top == set(range(5))


def test_top_left_crop():
    img = _rand_img(5, 12)
    out = imutils.top_left_crop(img, 8, 0)
    expected = np.zeros((8, 8, 3), np.uint8)
    expected[:5, :8] = img[:, :8]
    np.testing.assert_array_equal(out, expected)
    label = np.ones((5, 12), np.uint8)
    out = imutils.top_left_crop(label, 8, 255)
    assert (out[:5, :8] == 1).all() and (out[5:] == 255).all()


def test_hwc_to_chw():
    img = _rand_img(3, 4)
    out = imutils.hwc_to_chw(img)
    assert out.shape == (3, 3, 4) and out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out[2], img[:, :, 2])


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA", "1"])
def test_read_rgb_converts_modes(tmp_path, mode):
    rgb = _rand_img(6, 5)
    img = Image.fromarray(rgb).convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    img.save(path)
    with Image.open(path) as stored:
        assert stored.mode == mode   # the file really is in that mode
        stored_rgb = np.asarray(stored.convert("RGB"))
    out = imutils.read_rgb(str(path))
    assert out.shape == (6, 5, 3) and out.dtype == np.uint8
    if mode in ("L", "LA", "1"):
        gray = np.asarray(img.convert("L"))
        for c in range(3):
            np.testing.assert_array_equal(out[:, :, c], gray)
    elif mode in ("P", "RGBA"):
        np.testing.assert_array_equal(out, np.asarray(img.convert("RGB")))
        if mode == "RGBA":
            np.testing.assert_array_equal(out, rgb)
    else:  # CMYK: PIL's conversion of the decoded CMYK pixels, close to the original colours
        np.testing.assert_array_equal(out, stored_rgb)
        assert np.abs(out.astype(int) - rgb).mean() < 20


def test_read_rgb_16bit_gray_scaled_not_clipped(tmp_path):
    gray16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    path = tmp_path / "g16.png"
    Image.fromarray(gray16).save(path)
    out = imutils.read_rgb(str(path))
    np.testing.assert_array_equal(out[:, :, 0], np.round(gray16 / 257.0).astype(np.uint8))


def test_read_rgb_errors(tmp_path):
    with pytest.raises(InputError, match="missing image file .*nope.jpg"):
        imutils.read_rgb(str(tmp_path / "nope.jpg"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(InputError, match="bad.jpg"):
        imutils.read_rgb(str(bad))
    # a truncated JPEG: the header is valid but the data stops
    good = tmp_path / "good.jpg"
    Image.fromarray(_rand_img(64, 64)).save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(InputError, match="truncated.jpg"):
        imutils.read_rgb(str(truncated))


def test_read_rgb_applies_jpeg_exif_orientation_like_the_original_reader(tmp_path):
    import imageio.v2
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = 255
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = str(tmp_path / "rotated.jpg")
    img.save(path, exif=exif.tobytes())
    rotated = imutils.read_rgb(path)
    assert rotated.shape == (40, 20, 3)
    assert np.array_equal(rotated, imageio.v2.imread(path, format="JPEG-PIL"))  # imageio's legacy reader
    plain = str(tmp_path / "plain.jpg")
    img.save(plain)
    assert imutils.read_rgb(plain).shape == (20, 40, 3)
