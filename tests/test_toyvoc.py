"""ToyVOC generator (toy/toyvoc.py): determinism, the exact VOC layout, labels, void band, cue masks,
the OoD pool, and reading it back through voc12.dataloader like real VOC."""
import json
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from misc.utils import InputError, palette_voc
from toy import toyvoc

TINY = ["--n_train_aug", "6", "--n_train", "3", "--n_val", "2", "--n_ood_hard", "4", "--n_ood_easy", "4",
        "--long_min", "64", "--long_max", "64", "--gray_every", "2", "--two_class_prob", "0.5"]
OBJECT_VALUES = {toyvoc.CAT_LIST.index(c) + 1 for c in toyvoc.TOY_CLASSES}


def generate(root, seed=0, extra=()):
    args = toyvoc.parse_args(["--out", str(root / "voc"), "--ood_out", str(root / "ood"),
                              "--seed", str(seed), *TINY, *extra])
    info = toyvoc.run(args)
    return args, info


def read_list(voc, name):
    with open(os.path.join(voc, "ImageSets", "Segmentation", name + ".txt")) as f:
        return [line.strip() for line in f if line.strip()]


def all_files(root):
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    args, info = generate(root)
    return args, info


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    trees = {}
    for name, seed in (("a", 0), ("again", 0), ("b", 1)):
        generate(tmp_path / name, seed=seed)
        trees[name] = all_files(tmp_path / name)
    first, again, other = trees["a"], trees["again"], trees["b"]
    # jpg/xml/aug/cue, 5 palette GT and 5 object PNGs, 3 lists, json; ood + cue
    assert len(first) == 8 * 4 + 5 + 5 + 3 + 1 + 8 * 2 + 2
    assert sorted(first) == sorted(again)
    assert all(first[k] == again[k] for k in first)
    assert sorted(other) == sorted(first)
    images = [k for k in first if k.endswith(".jpg")]
    assert len(images) == 8 + 6 and all(other[k] != first[k] for k in images)


def test_voc_layout_and_splits(tiny):
    args, info = tiny
    voc = args.out
    train, val, trainval = read_list(voc, "train"), read_list(voc, "val"), read_list(voc, "trainval")
    aug = sorted(f[:-4] for f in os.listdir(os.path.join(voc, "SegmentationClassAug")))
    train_aug = [i for i in aug if i not in set(val)]
    assert len(aug) == 8 and len(train_aug) == 6 and len(train) == 3 and len(val) == 2
    assert set(train) <= set(train_aug) and not set(val) & set(train_aug)
    assert trainval == train + val
    assert sorted(os.listdir(os.path.join(voc, "JPEGImages"))) == [i + ".jpg" for i in aug]
    assert sorted(os.listdir(os.path.join(voc, "Annotations"))) == [i + ".xml" for i in aug]
    assert sorted(os.listdir(os.path.join(voc, "CueMasks"))) == [i + ".png" for i in aug]
    assert sorted(os.listdir(os.path.join(voc, "SegmentationClass"))) == sorted(i + ".png" for i in train + val)
    assert sorted(os.listdir(os.path.join(voc, "SegmentationObject"))) == sorted(i + ".png" for i in train + val)
    with open(os.path.join(voc, "toyvoc.json")) as f:
        meta = json.load(f)
    assert meta["complete"] is True and meta["parameters"]["seed"] == 0
    assert meta["n_train_aug"] == 6 and meta["classes"] == list(toyvoc.TOY_CLASSES)


def test_label_pngs_palette_and_values(tiny):
    args, _ = tiny
    voc = args.out
    pal = palette_voc()
    for img_id in read_list(voc, "trainval"):
        seg = Image.open(os.path.join(voc, "SegmentationClass", img_id + ".png"))
        assert seg.mode == "P"
        assert np.array_equal(np.array(seg.getpalette(), np.uint8).reshape(-1, 3)[:256], pal)
        aug = Image.open(os.path.join(voc, "SegmentationClassAug", img_id + ".png"))
        assert aug.mode == "L"
        assert np.array_equal(np.array(seg), np.array(aug))
        jpg = Image.open(os.path.join(voc, "JPEGImages", img_id + ".jpg"))
        assert jpg.mode == "RGB" and jpg.size == seg.size and max(jpg.size) == 64
        assert set(np.unique(np.array(seg)).tolist()) <= {0, 255} | OBJECT_VALUES


def test_object_pngs_in_voc_instance_format(tiny):
    """SegmentationObject: palette PNG, objects 1..N, 0 where the class map is 0, 255 exactly where it is 255;
    every object lies on one class, one object per XML object; read back as chainercv does."""
    from misc.instance_eval import load_instance_gt
    args, _ = tiny
    voc = args.out
    for img_id in read_list(voc, "trainval"):
        png = Image.open(os.path.join(voc, "SegmentationObject", img_id + ".png"))
        assert png.mode == "P" and np.array_equal(np.array(png.getpalette(), np.uint8).reshape(-1, 3)[:256],
                                                  palette_voc())
        objects, gt = np.array(png), np.array(Image.open(os.path.join(voc, "SegmentationClass", img_id + ".png")))
        assert np.array_equal(objects == 255, gt == 255) and np.array_equal(objects == 0, gt == 0)
        names = [o.findtext("name") for o in ET.parse(os.path.join(voc, "Annotations", img_id + ".xml")).getroot()
                 .findall("object")]
        assert sorted(set(np.unique(objects).tolist()) - {0, 255}) == list(range(1, len(names) + 1))
        masks, labels = load_instance_gt(voc, img_id)
        assert [toyvoc.CAT_LIST[k] for k in labels] == names   # object k is the k-th drawn, as in the XML
        for mask, label in zip(masks, labels):
            assert (gt[mask] == label + 1).all()


def test_xml_matches_segmentation(tiny):
    args, _ = tiny
    voc = args.out
    for img_id in read_list(voc, "trainval"):
        gt = np.array(Image.open(os.path.join(voc, "SegmentationClassAug", img_id + ".png")))
        root = ET.parse(os.path.join(voc, "Annotations", img_id + ".xml")).getroot()
        assert root.findtext("filename") == img_id + ".jpg"
        assert (int(root.findtext("size/height")), int(root.findtext("size/width"))) == gt.shape
        names = [o.findtext("name") for o in root.findall("object")]
        assert all(o.findtext("difficult") == "0" for o in root.findall("object"))
        present = {toyvoc.CAT_LIST[v - 1] for v in np.unique(gt) if 0 < v < 255}
        assert set(names) == present and len(names) >= 1
        for obj in root.findall("object"):  # the box (1-based, inclusive) holds every labelled pixel
            ys, xs = np.nonzero(gt == toyvoc.CAT_LIST.index(obj.findtext("name")) + 1)
            box = [int(obj.findtext("bndbox/" + k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            assert box[0] <= xs.min() + 1 and box[1] <= ys.min() + 1
            assert box[2] >= xs.max() + 1 and box[3] >= ys.max() + 1


def test_void_band_separates_objects_from_background(tiny):
    args, _ = tiny
    for img_id in read_list(args.out, "trainval"):
        gt = np.array(Image.open(os.path.join(args.out, "SegmentationClass", img_id + ".png")))
        assert (gt == 255).any()
        obj = (gt > 0) & (gt < 255)
        padded = np.pad(gt == 0, 1)
        bg_neighbour = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        assert not (obj & bg_neighbour).any()  # an object pixel never touches background directly


def test_void_band_function():
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    band = toyvoc.void_band([mask], 1)
    expected = np.zeros((20, 20), bool)
    expected[4:16, 4:16] = True
    expected[6:14, 6:14] = False
    assert np.array_equal(band, expected)
    assert band.sum() == 144 - 64
    assert not toyvoc.void_band([mask], 0).any()


def test_cue_masks_only_on_background_and_only_with_their_class(tiny):
    args, _ = tiny
    voc = args.out
    seen_cue = False
    for img_id in read_list(voc, "trainval"):
        cue = Image.open(os.path.join(voc, "CueMasks", img_id + ".png"))
        assert cue.mode == "L"
        cue = np.array(cue)
        gt = np.array(Image.open(os.path.join(voc, "SegmentationClass", img_id + ".png")))
        assert cue.shape == gt.shape
        assert not (cue[(gt > 0) & (gt < 255)]).any()
        cue_values = set(np.unique(cue).tolist()) - {0}
        assert cue_values <= set(np.unique(gt).tolist())  # a cue appears only with its own class
        seen_cue |= bool(cue_values)
    assert seen_cue


def test_plans_balance_classes_cue_rate_and_swaps():
    plans = toyvoc.plan_id_images(seed=3, n=600, two_class_prob=0.3, cue_drop_prob=0.4, swap_prob=0.0)
    count = {c: sum(c in (t, b) for t, b, _, _ in plans) for c in toyvoc.TOY_CLASSES}
    assert all(count[c] >= 60 for c in toyvoc.TOY_CLASSES)
    two = [t is not None and b is not None for t, b, _, _ in plans]
    assert 0.25 < np.mean(two) < 0.35
    bottoms = (None, *toyvoc.BOTTOM_CLASSES, *toyvoc.DISTRACTOR_CLASSES)
    assert all(t in (None, *toyvoc.TOP_CLASSES) and b in bottoms for t, b, _, _ in plans)
    # one-class images always show their cue; a two-class image drops at most one cue, and only
    # when both classes have one: an all-stuff image is never labelled with a cue class only
    cue_pairs = [t in toyvoc.CUE_CLASSES and b in toyvoc.CUE_CLASSES for t, b, _, _ in plans]
    assert all(tc and bc for (t, b, tc, bc), pair in zip(plans, cue_pairs) if not pair)
    assert all(tc or bc for t, b, tc, bc in plans)
    dropped = [not (tc and bc) for (t, b, tc, bc), pair in zip(plans, cue_pairs) if pair]
    assert 0.3 < np.mean(dropped) < 0.5
    swapped = toyvoc.plan_id_images(seed=3, n=600, two_class_prob=0.3, cue_drop_prob=0.4, swap_prob=0.5)
    natural = np.mean([t in (None, *toyvoc.TOP_CLASSES) and b in bottoms for t, b, _, _ in swapped])
    assert 0.4 < natural < 0.6  # generic stuff below (or above) is no evidence of a class


def test_ood_pool(tiny):
    args, _ = tiny
    ood = args.ood_out
    with open(os.path.join(ood, "candidates.txt")) as f:
        paths = [line.strip() for line in f if line.strip()]
    with open(os.path.join(ood, "manifest.json")) as f:
        manifest = json.load(f)
    assert [e["path"] for e in manifest] == paths and len(paths) == 8
    assert sorted(os.listdir(os.path.join(ood, "images"))) == sorted(os.path.basename(p) for p in paths)
    hard = [e for e in manifest if e["hard"]]
    assert len(hard) == 4 and all(e["cue"] in toyvoc.CUE_CLASSES for e in hard)
    assert [e["cue"] for e in hard] == list(toyvoc.CUE_CLASSES[:4])
    assert [e["cue_kind"] for e in hard] == [toyvoc.CUE_OF[c] for c in toyvoc.CUE_CLASSES[:4]]
    assert all(e["cue"] is None for e in manifest if not e["hard"])
    for e in manifest:  # a hard candidate shows its class's cue over a good part of it, an easy one none
        cue = np.asarray(Image.open(os.path.join(ood, e["cue_mask"])))
        with Image.open(os.path.join(ood, e["path"])) as img:
            assert cue.shape == img.size[::-1]
        if e["hard"]:
            assert set(np.unique(cue)) == {0, toyvoc.CAT_LIST.index(e["cue"]) + 1} and (cue > 0).mean() > 0.25
        else:
            assert not cue.any()
    modes = {}
    for e in manifest:
        with Image.open(os.path.join(ood, e["path"])) as img:
            modes[e["path"]] = img.mode
            assert max(img.size) == 64
        assert e["mode"] == modes[e["path"]]
    assert "L" in modes.values() and "P" in modes.values() and "RGB" in modes.values()
    assert all(p.endswith(".png") for p, m in modes.items() if m == "P")


def test_refuses_foreign_folder_and_removes_stale_files(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("not toyvoc")
    args = toyvoc.parse_args(["--out", str(foreign), "--ood_out", str(tmp_path / "ood"), *TINY])
    with pytest.raises(InputError, match="not made by toy.toyvoc"):
        toyvoc.run(args)
    with pytest.raises(InputError, match="--n_train"):
        toyvoc.run(toyvoc.parse_args(["--out", str(tmp_path / "x"), "--n_train", "9", "--n_train_aug", "4"]))
    generate(tmp_path)
    generate(tmp_path, extra=["--n_train_aug", "4", "--n_ood_easy", "1"])
    assert len(os.listdir(tmp_path / "voc" / "SegmentationClassAug")) == 6
    assert len(os.listdir(tmp_path / "voc" / "JPEGImages")) == 6
    assert len(os.listdir(tmp_path / "ood" / "images")) == 5


def test_reads_back_through_voc12_dataloader(tiny):
    from voc12 import dataloader as dl
    args, _ = tiny
    voc = args.out
    assert list(dl.CAT_LIST) == list(toyvoc.CAT_LIST)
    train, val = read_list(voc, "train"), read_list(voc, "val")
    assert dl.load_img_name_list(voc, "train") == train
    assert dl.load_img_name_list(voc, "val") == val
    train_aug = dl.load_img_name_list(voc, "train_aug")
    assert len(train_aug) == 6 and set(train) <= set(train_aug)
    ids = train_aug + val
    labels = dl.load_image_labels(voc, ids)
    assert labels.shape == (8, 20) and labels.dtype == np.float32
    for img_id, label in zip(ids, labels):
        gt = np.array(Image.open(os.path.join(voc, "SegmentationClassAug", img_id + ".png")))
        expected = np.zeros(20, np.float32)
        expected[[v - 1 for v in np.unique(gt) if 0 < v < 255]] = 1
        assert np.array_equal(label, expected)
    for img_id in train + val:
        gt = dl.load_gt(voc, img_id)
        assert gt.dtype == np.uint8
        assert np.array_equal(gt, np.array(Image.open(os.path.join(voc, "SegmentationClassAug", img_id + ".png"))))


@pytest.mark.parametrize("cls", toyvoc.CUE_CLASSES)
def test_scenes_object_touches_its_cue_and_hard_candidates_show_it(cls):
    from scipy import ndimage
    value = toyvoc.CAT_LIST.index(cls) + 1
    top, bottom = (cls, None) if cls in toyvoc.TOP_CLASSES else (None, cls)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        rgb, label, cue, objects = toyvoc.draw_scene(rng, 72, 96, top, bottom, True, True, True, 1)
        assert rgb.shape == (72, 96, 3) and rgb.dtype == np.uint8
        assert [c for c, _ in objects] == [cls]
        mask = objects[0][1]
        assert set(np.unique(cue).tolist()) == {0, value}
        assert 0.05 < (cue == value).mean() < 0.85            # visible around the object
        assert (ndimage.binary_dilation(mask, iterations=2) & (cue == value)).any()  # and touches
        assert np.array_equal(label == value, mask & (label != 255))
        # the same scene without its cue: generic stuff, no cue pixel
        _, _, no_cue, _ = toyvoc.draw_scene(np.random.default_rng(seed), 72, 96, top, bottom, False, False,
                                            True, 1)
        assert not no_cue.any()
        # a hard candidate: the cue, no object
        _, label, cue, objects = toyvoc.draw_scene(np.random.default_rng(seed), 72, 96, top, bottom, True,
                                                   True, False, 1)
        assert objects == [] and not label.any() and (cue == value).mean() > 0.25


def test_class_colour_prob_gives_the_class_hue_and_zero_changes_nothing():
    import colorsys
    parts = [(toyvoc.rect(-0.5, -0.5, 0.5, 0.5), "body")]
    for cls, hue in toyvoc.CLASS_HUE.items():
        mask, rgb = toyvoc.render_object(np.random.default_rng(3), parts, 64, 64, 32, 32, 40, False, 0.0,
                                         cls, class_colour_prob=1.0)
        pixels = rgb[mask] / 255
        hues = np.array([colorsys.rgb_to_hsv(*p)[0] for p in pixels[::7]])
        gap = np.abs((hues - hue + 0.5) % 1.0 - 0.5)
        assert mask.sum() > 500 and gap.max() < 0.031, cls
    plain = toyvoc.render_object(np.random.default_rng(5), parts, 64, 64, 32, 32, 40, False, 0.0)
    zero = toyvoc.render_object(np.random.default_rng(5), parts, 64, 64, 32, 32, 40, False, 0.0, "car", 0.0)
    assert all(np.array_equal(a, b) for a, b in zip(plain, zero))
    args = toyvoc.parse_args(["--class_colour_prob", "1.5"])
    with pytest.raises(InputError, match="class_colour_prob"):
        toyvoc.validate(args)


def test_foreign_cue_prob_puts_absent_classes_cues_where_generic_stuff_was():
    kwargs = dict(seed=3, n=600, two_class_prob=0.3, cue_drop_prob=0.4, swap_prob=0.0)
    assert toyvoc.plan_id_images(**kwargs, foreign_cue_prob=0.0) == toyvoc.plan_id_images(**kwargs)
    generic_regions = foreign = 0
    for t, b, tc, bc in toyvoc.plan_id_images(**kwargs, foreign_cue_prob=0.5):
        for cls, cue, region_classes in ((t, tc, toyvoc.TOP_CLASSES), (b, bc, toyvoc.BOTTOM_CLASSES)):
            if cls in toyvoc.CUE_CLASSES and cue is True:   # a region showing its own cue keeps it
                continue
            generic_regions += 1
            if isinstance(cue, str):   # the cue of a class of that region that is not in the image
                assert cue in region_classes and cue not in (t, b)
                foreign += 1
            else:
                assert cue in (True, False)
    assert 0.4 < foreign / generic_regions < 0.6
    # drawn: the region shows the foreign class's cue, the label holds only the image's own class
    rng = np.random.default_rng(0)
    rgb, label, cue, objects = toyvoc.draw_scene(rng, 72, 96, "aeroplane", "person", True, "cow", True, 1)
    assert [c for c, _ in objects] == ["person", "aeroplane"]
    cow, plane = toyvoc.CAT_LIST.index("cow") + 1, toyvoc.CAT_LIST.index("aeroplane") + 1
    assert set(np.unique(cue).tolist()) == {0, cow, plane} and (cue == cow).mean() > 0.2
    assert set(np.unique(label).tolist()) <= {0, 255, plane, toyvoc.CAT_LIST.index("person") + 1}
    with pytest.raises(InputError, match="foreign_cue_prob"):
        toyvoc.validate(toyvoc.parse_args(["--foreign_cue_prob", "-0.1"]))


def test_cue_reach_keeps_the_cue_near_objects_and_zero_changes_nothing():
    args = ("aeroplane", "cow", True, True, True, 1)
    full = toyvoc.draw_scene(np.random.default_rng(5), 96, 128, *args)
    same = toyvoc.draw_scene(np.random.default_rng(5), 96, 128, *args, cue_reach=0.0)
    assert all(np.array_equal(a, b) for a, b in zip(full[:3], same[:3]))
    rgb, label, cue, objects = toyvoc.draw_scene(np.random.default_rng(5), 96, 128, *args, cue_reach=0.1)
    assert np.array_equal(label, full[1])   # the same objects at the same places
    distance = ndimage.distance_transform_edt(~np.any([m for _, m in objects], axis=0))
    assert (cue > 0).any() and distance[cue > 0].max() <= 0.1 * 128
    assert np.array_equal(cue[distance <= 12.8], full[2][distance <= 12.8])   # near: the cue as before
    assert (full[2] > 0).sum() > 1.5 * (cue > 0).sum()
    far = (full[2] > 0) & (cue == 0)
    assert not np.array_equal(rgb[far], full[0][far])   # the far part of the cue region repainted
    # a hard OoD image: the cue where its object would be, nothing far from it
    rgb, label, cue, objects = toyvoc.draw_scene(np.random.default_rng(5), 96, 128, None, "cow", True, True,
                                                 False, 1, cue_reach=0.1)
    assert objects == [] and (label == 0).all() and 0 < (cue > 0).mean() < 0.5
    with pytest.raises(InputError, match="cue_reach"):
        toyvoc.validate(toyvoc.parse_args(["--cue_reach", "-0.1"]))
