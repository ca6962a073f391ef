"""VOC instance AP (misc/instance_eval.py: chainercv's eval_instance_segmentation_voc) and the COCO output and
cross-check (misc/coco.py), on cases computed by hand (docs/method.md §9)."""
import numpy as np
import pytest

from misc import coco, instance_eval
from misc.instance_eval import eval_instance_segmentation_voc
from misc.utils import InputError

H, W = 4, 6


def box(rows, cols, shape=(H, W)):
    mask = np.zeros(shape, bool)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = True
    return mask


def stack(*masks, shape=(H, W)):
    return np.stack(masks) if masks else np.zeros((0,) + shape, bool)


def hand_case():
    """Image A: ground truth two class-0 instances (columns 0-1, columns 4-5); predictions: column 0-1 exactly
    (0.9, TP), the same mask again (0.8, FP: its best instance is taken), columns 3-5 (0.7, IoU 8/12, TP).
    Image B: one class-0 instance (columns 0-2) with no class-0 prediction, one class-2 instance with no
    prediction, a class-1 prediction (0.6) without any class-1 instance."""
    gt_a, gt_b1, gt_b2 = stack(box((0, 4), (0, 2)), box((0, 4), (4, 6))), box((0, 4), (0, 3)), box((0, 2), (4, 6))
    pred_masks = [stack(box((0, 4), (0, 2)), box((0, 4), (0, 2)), box((0, 4), (3, 6))), stack(box((2, 4), (3, 6)))]
    pred_labels = [np.array([0, 0, 0]), np.array([1])]
    pred_scores = [np.array([0.9, 0.8, 0.7], np.float32), np.array([0.6], np.float32)]
    gt_masks = [gt_a, stack(gt_b1, gt_b2)]
    gt_labels = [np.array([0, 0], np.int32), np.array([0, 2], np.int32)]
    return pred_masks, pred_labels, pred_scores, gt_masks, gt_labels


def test_ap_by_hand():
    # class 0, ranked: TP (0.9), FP (0.8), TP (0.7) of 3 instances: precision 1, 1/2, 2/3 at recall 1/3, 1/3, 2/3
    # envelope 1 up to recall 1/3, 2/3 up to 2/3: AP = 1/3 + 2/9 = 5/9; class 1: no instance, NaN; class 2: 0
    result = eval_instance_segmentation_voc(*hand_case(), iou_thresh=0.5)
    assert result["ap"].shape == (3,)
    assert result["ap"][0] == pytest.approx(5 / 9) and np.isnan(result["ap"][1]) and result["ap"][2] == 0
    assert result["map"] == pytest.approx(5 / 18)
    # 11 points: recall >= 0, .1, .2, .3 -> 1; >= .4, .5, .6 -> 2/3; above 2/3 -> 0: (4 + 2) / 11
    result07 = eval_instance_segmentation_voc(*hand_case(), iou_thresh=0.5, use_07_metric=True)
    assert result07["ap"][0] == pytest.approx(6 / 11) and np.isnan(result07["ap"][1])
    assert result07["map"] == pytest.approx(3 / 11)
    # at IoU 0.7 the 8/12 match fails: TP, FP, FP -> AP 1/3
    assert eval_instance_segmentation_voc(*hand_case(), iou_thresh=0.7)["ap"][0] == pytest.approx(1 / 3)


def test_iou_of_exactly_the_threshold_matches():
    gt = stack(box((0, 2), (0, 2)))
    pred = stack(box((0, 2), (0, 4)))   # IoU 4 / 8 = 0.5
    assert instance_eval.mask_iou(pred, gt).tolist() == [[0.5]]
    assert eval_instance_segmentation_voc([pred], [np.array([3])], [np.array([1.0])], [gt], [np.array([3])],
                                          iou_thresh=0.5)["ap"][3] == 1


def test_equal_scores_rank_the_later_first():
    """Two copies of one instance's mask at one score: the first one processed is the TP; a stable sort reversed
    puts it after the FP (chainercv on a machine whose default sort is stable): precision 0 then 1/2 at recall
    1/2, envelope 1/2: AP = 1/2 * 1/2. Across images likewise: image 2's FP before image 1's TP."""
    gt = stack(box((0, 4), (0, 2)), box((0, 4), (4, 6)))
    pred = stack(box((0, 4), (0, 2)), box((0, 4), (0, 2)))
    result = eval_instance_segmentation_voc([pred], [np.array([0, 0])], [np.array([0.5, 0.5])], [gt],
                                            [np.array([0, 0])])
    assert result["ap"][0] == pytest.approx(0.25)
    one_gt = stack(box((0, 4), (0, 2)))
    across = eval_instance_segmentation_voc(
        [stack(box((0, 4), (0, 2))), stack(box((0, 1), (5, 6)))], [np.array([0]), np.array([0])],
        [np.array([0.5]), np.array([0.5])], [one_gt, one_gt], [np.array([0]), np.array([0])])
    # ranked FP (image 2), TP (image 1) of 2 instances: precision 0, 1/2 at recall 0, 1/2 -> AP 1/4
    assert across["ap"][0] == pytest.approx(0.25)


def test_no_detections_give_zero_and_no_images_nan():
    gt = stack(box((0, 4), (0, 2)))
    result = eval_instance_segmentation_voc([stack()], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)], [gt],
                                            [np.array([5])])
    assert result["ap"].shape == (6,) and result["ap"][5] == 0 and np.isnan(result["ap"][:5]).all()
    assert result["map"] == 0
    nothing = eval_instance_segmentation_voc([], [], [], [], [])
    assert nothing["ap"].shape == (0,) and np.isnan(nothing["map"])


def test_void_pixels_belong_to_no_instance():
    """VOC marks object outlines 255 in both PNGs: the instance is the object id's pixels only, and a prediction
    that also covers the void ring is scored on all its pixels (no ignore region in chainercv's IoU)."""
    class_map = np.zeros((6, 6), np.uint8)
    object_map = np.zeros((6, 6), np.uint8)
    class_map[1:5, 1:5] = object_map[1:5, 1:5] = 255
    class_map[2:4, 2:4], object_map[2:4, 2:4] = 9, 1      # a cow, object 1: 4 pixels inside a 12-pixel ring
    class_map[5, 0], object_map[5, 0] = 15, 2             # a one-pixel pottedplant, object 2
    masks, labels = instance_eval.instances_from_maps(class_map, object_map)
    assert labels.tolist() == [8, 14] and masks.dtype == bool and masks.shape == (2, 6, 6)
    assert masks[0].sum() == 4 and masks[0][2:4, 2:4].all() and masks[1].sum() == 1
    ring = box((1, 5), (1, 5), shape=(6, 6))  # IoU 4/16
    scores = [np.array([0.9])]
    assert eval_instance_segmentation_voc([ring[None]], [np.array([8])], scores, [masks], [labels])["ap"][8] == 0
    exact = eval_instance_segmentation_voc([masks[:1]], [np.array([8])], scores, [masks], [labels])
    assert exact["ap"][8] == 1 and exact["ap"][14] == 0 and exact["map"] == 0.5
    object_map[0, 0] = 3   # an object over background pixels: the ground truth is inconsistent
    with pytest.raises(InputError, match="object 3 covers pixels of class value 0"):
        instance_eval.instances_from_maps(class_map, object_map, "x.png")


def test_instance_ground_truth_of_the_fake_voc(tmp_path):
    from fakevoc import make_fake_voc
    voc = make_fake_voc(tmp_path / "VOC2012", n_train=3, n_val=1, size=48, seed=3)
    for img_id in voc["train"]:
        masks, labels = instance_eval.load_instance_gt(voc["root"], img_id)
        gt = voc["gt"][img_id]
        assert sorted(labels.tolist()) == sorted(np.nonzero(voc["labels"][img_id])[0].tolist())
        for mask, label in zip(masks, labels):
            assert mask.any() and (gt[mask] == label + 1).all()
        assert np.array_equal(np.any(masks, axis=0), (gt > 0) & (gt < 255))
    instance_eval.require_instance_gt(voc["root"], voc["train"])
    with pytest.raises(InputError, match="instance ground truth.* missing .*2099_000001"):
        instance_eval.require_instance_gt(voc["root"], voc["train"] + ["2099_000001"])


# ------------------------------------------------------------------------------------------------------ COCO

@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools
def test_coco_json_of_detections():
    from pycocotools import mask as mask_utils
    masks = stack(box((0, 2), (1, 3)), box((1, 4), (0, 6)), box((3, 4), (0, 1)))
    det = {"score": np.array([0.7, 5e-6, 1e-5, 2e-5], np.float32), "mask": np.concatenate([masks, masks[:1]]),
           "class": np.array([14, 2, 0, 3])}
    out = coco.detections_to_coco([("2007_000032", (H, W), det)])
    assert [c["id"] for c in out["categories"]] == list(range(20)) and out["categories"][14]["name"] == "person"
    assert out["images"] == [{"id": 2007000032, "file_name": "2007_000032.jpg", "height": H, "width": W}]
    # 5e-6 < 1e-5 is left out, and so is the float32 nearest 1e-5 (9.99999975e-06, compared in float64)
    assert [a["category_id"] for a in out["annotations"]] == [14, 3] and [a["id"] for a in out["annotations"]] == [1, 2]
    first = out["annotations"][0]
    assert first["area"] == 4 and first["bbox"] == [1, 0, 2, 2] and first["score"] == pytest.approx(0.7)
    rle = {"size": first["segmentation"]["size"], "counts": first["segmentation"]["counts"].encode()}
    assert np.array_equal(mask_utils.decode(rle).astype(bool), masks[0])
    import json
    json.dumps(out)  # JSON-ready
    with pytest.raises(ValueError, match="no COCO image id"):
        coco.image_id("img_a")


def test_coco_cross_check_by_hand():
    """The hand case with COCO's rules: class 0 ranked TP, FP, TP (recall 1/3, 1/3, 2/3): the envelope is 1 on
    the 34 recall points 0..0.33, 2/3 on the 33 points 0.34..0.66, 0 above: 56/101; class 2 (an instance, no
    detection) 0; class 1 (no instance) left out: mean 28/101."""
    pred_masks, pred_labels, pred_scores, gt_masks, gt_labels = hand_case()
    names = ["2007_000001", "2007_000002"]
    detections = coco.detections_to_coco([(n, (H, W), {"score": s, "mask": m, "class": c}) for n, m, c, s in
                                          zip(names, pred_masks, pred_labels, pred_scores)])
    ground_truth = coco.ground_truth_to_coco([(n, (H, W), m, c) for n, m, c in zip(names, gt_masks, gt_labels)])
    mean, per_class = coco.coco_ap50(ground_truth, detections)
    assert per_class[0] == pytest.approx(56 / 101) and per_class[2] == 0 and np.isnan(per_class[1])
    assert mean == pytest.approx(28 / 101)
    assert np.isnan(coco.coco_ap50(ground_truth, coco.detections_to_coco([]))[0])
