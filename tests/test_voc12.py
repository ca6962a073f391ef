import os

import numpy as np
import pytest
import torch
from PIL import Image

from misc import imutils
from misc.utils import InputError, load_npz, palette_voc
from voc12 import dataloader as dl

# id -> (objects as (name, difficult, parts), image (h, w))
FAKE = {
    "2007_000001": ([("person", 0, ["head", "hand"]), ("dog", 1, [])], (64, 48)),
    "2007_000002": ([("aeroplane", 0, [])], (48, 64)),
    "2007_000003": ([("tvmonitor", 1, []), ("tvmonitor", 0, [])], (64, 64)),
    "2008_000004": ([("cat", 0, []), ("sofa", 0, [])], (40, 56)),
    "2008_000005": ([("bird", 0, [])], (56, 40)),
}
TRAIN = ["2007_000001", "2007_000003"]
VAL = ["2007_000002", "2008_000005"]
AUG = ["2007_000001", "2007_000002", "2008_000004", "2008_000005"]  # SegmentationClassAug pngs


def _xml(objects):
    parts = []
    for name, difficult, part_names in objects:
        part_xml = "".join(f"<part><name>{p}</name><bndbox><xmin>1</xmin></bndbox></part>" for p in part_names)
        parts.append(f"<object>\n\t\t<name>{name}</name><pose>Left</pose><truncated>1</truncated>"
                     f"<difficult>{difficult}</difficult>{part_xml}</object>")
    return (f"<annotation><folder>VOC2012</folder><filename>x.jpg</filename>"
            f"<owner><flickrid>me</flickrid><name>Someone</name></owner>{''.join(parts)}</annotation>")


def _gt(h, w, seed):
    rng = np.random.RandomState(seed)
    gt = rng.randint(0, 21, size=(h, w)).astype(np.uint8)
    gt[0, :] = 255
    return gt


def make_voc(root):
    for sub in ["JPEGImages", "Annotations", "SegmentationClass", "SegmentationClassAug",
                "ImageSets/Segmentation"]:
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for k, (img_id, (objects, (h, w))) in enumerate(FAKE.items()):
        rgb = np.random.RandomState(k).randint(0, 256, size=(h, w, 3)).astype(np.uint8)
        Image.fromarray(rgb).save(os.path.join(root, "JPEGImages", img_id + ".jpg"), quality=95)
        with open(os.path.join(root, "Annotations", img_id + ".xml"), "w") as f:
            f.write(_xml(objects))
        pimg = Image.new("P", (w, h))
        pimg.putdata(list(_gt(h, w, k).reshape(-1)))
        pimg.putpalette(list(palette_voc().reshape(-1)))
        pimg.save(os.path.join(root, "SegmentationClass", img_id + ".png"))
        if img_id in AUG:
            Image.fromarray(_gt(h, w, k + 100)).save(os.path.join(root, "SegmentationClassAug", img_id + ".png"))
    for name, ids in [("train", TRAIN), ("val", VAL), ("trainval", TRAIN + VAL)]:
        with open(os.path.join(root, "ImageSets/Segmentation", name + ".txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    return str(root)


@pytest.fixture
def voc(tmp_path):
    return make_voc(tmp_path / "VOC2012")


def _label(*names):
    out = np.zeros(20, np.float32)
    for n in names:
        out[dl.CAT_LIST.index(n)] = 1
    return out


def test_cat_list():
    assert dl.N_CLASSES == 20 == len(dl.CAT_LIST)
    assert dl.CAT_LIST[0] == "aeroplane" and dl.CAT_LIST[10] == "diningtable" and dl.CAT_LIST[19] == "tvmonitor"


def test_lists(voc, tmp_path):
    assert dl.load_img_name_list(voc, "train") == TRAIN
    assert dl.load_img_name_list(voc, "val") == VAL
    assert dl.load_img_name_list(voc, "trainval") == TRAIN + VAL
    assert dl.load_img_name_list(voc, "train_aug") == ["2007_000001", "2008_000004"]
    custom = tmp_path / "mine.txt"
    custom.write_text("2008_000004\n\n2007_000003  \n")
    assert dl.load_img_name_list(voc, str(custom)) == ["2008_000004", "2007_000003"]
    deeplab = tmp_path / "deeplab.txt"
    deeplab.write_text("/JPEGImages/2007_000001.jpg /SegmentationClassAug/2007_000001.png\n")
    assert dl.load_img_name_list(voc, str(deeplab)) == ["2007_000001"]


def test_list_errors(voc, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(InputError, match="empty.txt is empty"):
        dl.load_img_name_list(voc, str(empty))
    with pytest.raises(InputError, match="nothere.txt not found: expected a split name"):
        dl.load_img_name_list(voc, str(tmp_path / "nothere.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_text("2007_000001 -1\n")
    with pytest.raises(InputError, match="bad.txt, line 1"):
        dl.load_img_name_list(voc, str(bad))
    os.remove(os.path.join(voc, "ImageSets/Segmentation/val.txt"))
    with pytest.raises(InputError, match="val.txt"):
        dl.load_img_name_list(voc, "train_aug")


@pytest.mark.parametrize("folder, call", [
    ("JPEGImages", lambda v: dl.VOC12ImageDataset("train", v)),
    ("Annotations", lambda v: dl.VOC12ClassificationDataset("train", v)),
    ("SegmentationClass", lambda v: dl.load_gt(v, "2007_000001")),
    ("SegmentationClassAug", lambda v: dl.load_img_name_list(v, "train_aug")),
    ("ImageSets/Segmentation", lambda v: dl.load_img_name_list(v, "train")),
])
def test_missing_folder_is_named(voc, folder, call):
    import shutil
    shutil.rmtree(os.path.join(voc, folder))
    with pytest.raises(InputError, match=f"missing folder .*{folder}"):
        call(voc)


def test_missing_root_and_image(voc, tmp_path):
    with pytest.raises(InputError, match="missing folder .*nowhere"):
        dl.VOC12ImageDataset(["2007_000001"], str(tmp_path / "nowhere"))
    os.remove(os.path.join(voc, "JPEGImages", "2007_000003.jpg"))
    with pytest.raises(InputError, match="1 listed image.*2007_000003.jpg"):
        dl.VOC12ImageDataset("train", voc)


def test_image_labels_and_cache(voc):
    ids = ["2007_000001", "2007_000003", "2008_000004"]
    labels = dl.load_image_labels(voc, ids)
    assert labels.dtype == np.float32 and labels.shape == (3, 20)
    np.testing.assert_array_equal(labels[0], _label("person", "dog"))   # difficult dog kept, parts ignored
    np.testing.assert_array_equal(labels[1], _label("tvmonitor"))
    np.testing.assert_array_equal(labels[2], _label("cat", "sofa"))
    cache = load_npz(os.path.join(voc, "cls_labels.npz"))
    assert list(cache["ids"]) == sorted(ids)
    np.testing.assert_array_equal(cache["labels"], labels[np.argsort(ids)])
    # reuse: a cached id is not parsed again (its XML is broken now but its mtime is kept)
    xml = os.path.join(voc, "Annotations", "2007_000001.xml")
    stat = os.stat(xml)
    with open(xml, "w") as f:
        f.write("<annotation><object><name>zebra</name></object></annotation>")
    os.utime(xml, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    np.testing.assert_array_equal(dl.load_image_labels(voc, ["2007_000001"])[0], _label("person", "dog"))
    # extension: a new id is added to the cache file
    labels = dl.load_image_labels(voc, ["2008_000005", "2007_000001"])
    np.testing.assert_array_equal(labels[0], _label("bird"))
    assert "2008_000005" in list(load_npz(os.path.join(voc, "cls_labels.npz"))["ids"])
    # a changed XML (new mtime) is parsed again: here it has an unknown class -> error naming the xml
    os.utime(xml, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(InputError, match="2007_000001.xml: unknown object name 'zebra'"):
        dl.load_image_labels(voc, ["2007_000001"])


def test_image_labels_read_only_root(voc, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(dl, "save_npz", refuse)  # as on a read-only dataset folder
    try:
        labels = dl.load_image_labels(voc, ["2008_000004"])
        np.testing.assert_array_equal(labels[0], _label("cat", "sofa"))
        assert not os.path.exists(os.path.join(voc, "cls_labels.npz"))
        assert os.path.abspath(voc) in dl._MEMORY_LABELS
        labels = dl.load_image_labels(voc, ["2007_000002", "2008_000004"])
        np.testing.assert_array_equal(labels, np.stack([_label("aeroplane"), _label("cat", "sofa")]))
    finally:
        dl._MEMORY_LABELS.clear()


def test_missing_xml(voc):
    os.remove(os.path.join(voc, "Annotations", "2007_000003.xml"))
    with pytest.raises(InputError, match="2007_000003.xml"):
        dl.VOC12ClassificationDataset("train", voc)


def test_load_gt_palette_indices(voc):
    gt = dl.load_gt(voc, "2007_000002")
    assert gt.dtype == np.uint8 and gt.shape == (48, 64)
    np.testing.assert_array_equal(gt, _gt(48, 64, 1))
    assert (gt == 255).any()
    rgb_png = os.path.join(voc, "SegmentationClass", "2007_000002.png")
    Image.open(rgb_png).convert("RGB").save(rgb_png)
    with pytest.raises(InputError, match="2007_000002.png is a RGB image"):
        dl.load_gt(voc, "2007_000002")
    with pytest.raises(InputError, match="missing file .*2099_000000.png"):
        dl.load_gt(voc, "2099_000000")


def test_classification_recipes(voc):
    train = dl.VOC12ClassificationDataset.for_training("train", voc, resize_long=(40, 80), crop_size=32)
    np.random.seed(0)
    item = train[0]
    assert item["name"] == "2007_000001"
    assert item["img"].shape == (3, 32, 32) and item["img"].dtype == np.float32
    assert isinstance(item["label"], torch.Tensor)
    np.testing.assert_array_equal(item["label"].numpy(), _label("person", "dog"))

    val = dl.VOC12ClassificationDataset.for_validation("train", voc, crop_size=80)
    item = val[1]   # 2007_000003, 64 x 64: top-left, zero padding
    img = imutils.read_rgb(os.path.join(voc, "JPEGImages", "2007_000003.jpg"))
    np.testing.assert_array_equal(item["img"][:, :64, :64], imutils.hwc_to_chw(imutils.normalize(img)))
    assert (item["img"][:, 64:] == 0).all() and (item["img"][:, :, 64:] == 0).all()


def test_image_dataset_order_matches_literal_pipeline(voc):
    ds = dl.VOC12ImageDataset(["2008_000004"], voc, resize_long=(50, 70), hor_flip=True, crop_size=48,
                              crop_method="random")
    np.random.seed(11)
    out = ds[0]["img"]
    np.random.seed(11)
    img = imutils.read_rgb(os.path.join(voc, "JPEGImages", "2008_000004.jpg"))
    img = imutils.random_resize_long(img, 50, 70)
    img = imutils.random_flip(imutils.normalize(img))
    img = imutils.random_crop(img, None, 48, (0, 255))
    np.testing.assert_array_equal(out, imutils.hwc_to_chw(img))


def test_msf(voc):
    ds = dl.VOC12ClassificationDatasetMSF("train", voc, scales=(1.0, 0.5, 1.5))
    item = ds[0]   # 64 x 48
    assert item["size"] == (64, 48)
    assert [x.shape for x in item["img"]] == [(2, 3, 64, 48), (2, 3, 32, 24), (2, 3, 96, 72)]
    img = imutils.read_rgb(os.path.join(voc, "JPEGImages", "2007_000001.jpg"))
    np.testing.assert_array_equal(item["img"][0][0], imutils.hwc_to_chw(imutils.normalize(img)))
    for x in item["img"]:
        assert x.dtype == np.float32
        np.testing.assert_array_equal(x[1], x[0][:, :, ::-1])
    np.testing.assert_array_equal(item["img"][1][0],
                                  imutils.hwc_to_chw(imutils.normalize(imutils.rescale(img, 0.5, 3))))
    np.testing.assert_array_equal(item["label"].numpy(), _label("person", "dog"))
    # one scale is still a list, and the default collate keeps it a list of batched tensors
    ds1 = dl.VOC12ClassificationDatasetMSF("train", voc, scales=(1.0,))
    batch = next(iter(torch.utils.data.DataLoader(ds1, batch_size=1)))
    assert isinstance(batch["img"], list) and batch["img"][0].shape == (1, 2, 3, 64, 48)
    assert batch["name"] == ["2007_000001"]


def test_segmentation_dataset(voc, tmp_path):
    label_dir = tmp_path / "ir_label"
    label_dir.mkdir()
    for k, img_id in enumerate(TRAIN):
        h, w = FAKE[img_id][1]
        Image.fromarray(_gt(h, w, 50 + k)).save(label_dir / (img_id + ".png"))
    ds = dl.VOC12SegmentationDataset("train", str(label_dir), 80, voc, rescale=(0.5, 1.5), hor_flip=True)
    np.random.seed(3)
    out = ds[0]
    np.random.seed(3)
    img = imutils.read_rgb(os.path.join(voc, "JPEGImages", TRAIN[0] + ".jpg"))
    img, label = imutils.random_scale(img, _gt(64, 48, 50), (0.5, 1.5))
    img, label = imutils.random_flip(imutils.normalize(img), label)
    img, label = imutils.random_crop(img, label, 80, (0, 255))
    assert out["name"] == TRAIN[0]
    np.testing.assert_array_equal(out["img"], imutils.hwc_to_chw(img))
    np.testing.assert_array_equal(out["label"], label)
    assert out["label"].dtype == np.uint8 and out["img"].shape == (3, 80, 80)
    assert (out["label"] == 255).all(axis=0).any()  # width <= 72 < 80: padded columns

    top = dl.VOC12SegmentationDataset("train", str(label_dir), 80, voc, crop_method="top_left")[1]
    assert (top["label"][:64, :64] == _gt(64, 64, 51)).all() and (top["label"][64:] == 255).all()

    os.remove(label_dir / (TRAIN[1] + ".png"))
    with pytest.raises(InputError, match="1 label PNG.*2007_000003.png"):
        dl.VOC12SegmentationDataset("train", str(label_dir), 80, voc)
    with pytest.raises(InputError, match="missing folder .*no_labels"):
        dl.VOC12SegmentationDataset("train", str(tmp_path / "no_labels"), 80, voc)
