"""Instance pseudo labels in COCO format (the release's make_cocoann, docs/method.md §9) and a COCO-style
AP at IoU 0.5 through pycocotools, printed beside the VOC AP as a cross-check (not the paper's metric).

COCO ids as the release: image id = int of the image name without its underscore ("2007_000032" ->
2007000032); category id = the 0-based VOC class; one annotation per detection with score >= 1e-5, its mask
as COCO's compressed RLE (pycocotools.mask.encode, counts as text). The release reads its
categories from a pascal_val2012.json it does not ship: the 20 VOC categories are written here.
"""
import contextlib
import io

import numpy as np

MIN_SCORE = 1e-5


def categories():
    from voc12.dataloader import CAT_LIST
    return [{"id": index, "name": name, "supercategory": "voc"} for index, name in enumerate(CAT_LIST)]


def image_id(name):
    """The release's COCO image id: the name's digits as one int ("2007_000032" -> 2007000032)."""
    digits = name.replace("_", "")
    if not digits.isdigit():
        raise ValueError(f"image name {name!r} is not VOC's <year>_<number>: no COCO image id")
    return int(digits)


def encode_mask(mask):
    """COCO RLE of a (H, W) bool mask, JSON-ready (counts as text)."""
    from pycocotools import mask as mask_utils
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _annotation(annotation_id, img_id, category, mask, score=None):
    from pycocotools import mask as mask_utils
    rle = encode_mask(mask)
    coco_rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    entry = {"id": annotation_id, "image_id": img_id, "category_id": int(category), "segmentation": rle,
             "area": float(mask_utils.area(coco_rle)), "bbox": [float(v) for v in mask_utils.toBbox(coco_rle)],
             "iscrowd": 0}
    if score is not None:
        entry["score"] = float(score)
    return entry


def image_entry(name, image_size):
    height, width = image_size
    return {"id": image_id(name), "file_name": name + ".jpg", "height": int(height), "width": int(width)}


def kept_score(score):
    """Whether a detection of `score` is written (and drawn in samples.png): score >= 1e-5, compared in float64
    as the release did (a float32 comparison would keep float32(1e-5))."""
    return float(score) >= MIN_SCORE


def detection_annotations(name, det, first_id):
    """The annotations (with scores) of one image's detections dict, ids from `first_id`; scores < 1e-5 left out."""
    kept = [(mask, category, score) for score, mask, category in zip(det["score"], det["mask"], det["class"])
            if kept_score(score)]
    return [_annotation(first_id + k, image_id(name), category, mask, score)
            for k, (mask, category, score) in enumerate(kept)]


def ground_truth_annotations(name, masks, labels, first_id):
    """The annotations of one image's ground-truth instances (masks (K, H, W), 0-based labels (K,))."""
    return [_annotation(first_id + k, image_id(name), label, mask)
            for k, (mask, label) in enumerate(zip(masks, labels))]


def new_coco():
    return {"images": [], "annotations": [], "categories": categories()}


def detections_to_coco(images):
    """A COCO dict (images, annotations with scores, categories) of [(name, (H, W), detections dict)];
    detections with score < 1e-5 are left out, annotation ids count from 1."""
    out = new_coco()
    for name, image_size, det in images:
        out["images"].append(image_entry(name, image_size))
        out["annotations"] += detection_annotations(name, det, len(out["annotations"]) + 1)
    return out


def ground_truth_to_coco(images):
    """A COCO ground-truth dict of [(name, (H, W), masks (K, H, W), labels (K,))]."""
    out = new_coco()
    for name, image_size, masks, labels in images:
        out["images"].append(image_entry(name, image_size))
        out["annotations"] += ground_truth_annotations(name, masks, labels, len(out["annotations"]) + 1)
    return out


def coco_ap50(gt_coco, det_coco):
    """COCO-style mask AP at IoU 0.5 (pycocotools COCOeval, 101 recall points, up to 100 detections per image,
    all areas): (mean over the classes with ground truth, {class id: AP}); NaN without any detection."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    detections = det_coco["annotations"]
    class_ids = [c["id"] for c in gt_coco["categories"]]
    if not detections:
        return float("nan"), {c: float("nan") for c in class_ids}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = gt_coco
        gt.createIndex()
        results = gt.loadRes([{k: v for k, v in d.items() if k != "id"} for d in detections])
        evaluator = COCOeval(gt, results, iouType="segm")
        evaluator.params.iouThrs = np.array([0.5])
        evaluator.evaluate()
        evaluator.accumulate()
    # precision: (iou thresholds, recall points, classes, areas, max detections); -1 where undefined
    precision = evaluator.eval["precision"][0, :, :, 0, -1]
    per_class = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        column = precision[:, k]
        per_class[cat_id] = float(column[column > -1].mean()) if (column > -1).any() else float("nan")
    defined = [v for v in per_class.values() if not np.isnan(v)]
    return (float(np.mean(defined)) if defined else float("nan")), per_class
