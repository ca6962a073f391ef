import os

import numpy as np
import pytest
from PIL import Image

from misc import imutils
from misc.utils import InputError
from wood.data import OoDClassificationDataset, OoDFeatureDataset, load_ood_list


@pytest.fixture
def ood(tmp_path):
    root = tmp_path / "ood"
    (root / "sub").mkdir(parents=True)
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 256, (40, 64, 3)).astype(np.uint8)).save(root / "a.jpg")
    Image.fromarray(rng.randint(0, 256, (64, 30)).astype(np.uint8)).save(root / "sub" / "gray.png")
    Image.fromarray(rng.randint(0, 256, (50, 50, 4)).astype(np.uint8)).save(root / "rgba.png")
    lst = tmp_path / "ood_list.txt"
    lst.write_text("a.jpg\n\nsub/gray.png\nrgba.png\n")
    return str(root), str(lst)


def test_load_ood_list(ood, tmp_path):
    root, lst = ood
    assert load_ood_list(root, lst) == ["a.jpg", "sub/gray.png", "rgba.png"]
    with pytest.raises(InputError, match="missing file .*none.txt"):
        load_ood_list(root, str(tmp_path / "none.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(InputError, match="empty.txt is empty"):
        load_ood_list(root, str(empty))
    bad = tmp_path / "bad.txt"
    bad.write_text("a.jpg\nmissing.jpg\n")
    with pytest.raises(InputError, match="missing.jpg"):
        load_ood_list(root, str(bad))


def test_classification_recipe(ood):
    root, lst = ood
    ds = OoDClassificationDataset(root, load_ood_list(root, lst), resize_long=(40, 80), crop_size=48)
    assert len(ds) == 3
    np.random.seed(2)
    item = ds[1]
    np.random.seed(2)
    img = imutils.read_rgb(os.path.join(root, "sub/gray.png"))
    assert img.shape == (64, 30, 3)
    img = imutils.random_resize_long(img, 40, 80)
    img = imutils.random_flip(imutils.normalize(img))
    img = imutils.random_crop(img, None, 48, (0, 255))
    assert item["name"] == "sub/gray.png"
    assert item["img"].shape == (3, 48, 48) and item["img"].dtype == np.float32
    np.testing.assert_array_equal(item["img"], imutils.hwc_to_chw(img))


def test_feature_recipe_long_side_exact(ood):
    root, lst = ood
    ds = OoDFeatureDataset(root, load_ood_list(root, lst), long_side=100)
    shapes = [ds[i]["img"].shape for i in range(3)]
    assert shapes == [(3, 62, 100), (3, 100, 47), (3, 100, 100)]   # 40*100/64 = 62.5 -> 62 (half to even)
    img = imutils.read_rgb(os.path.join(root, "rgba.png"))
    np.testing.assert_array_equal(ds[2]["img"], imutils.hwc_to_chw(imutils.normalize(imutils.rescale(img, 2, 3))))


def test_dataset_checks_files(ood):
    root, _ = ood
    with pytest.raises(InputError, match="nope.png"):
        OoDFeatureDataset(root, ["a.jpg", "nope.png"])
    with pytest.raises(InputError, match="missing folder"):
        OoDClassificationDataset(root + "_x", ["a.jpg"])
