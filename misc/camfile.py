"""Reading a CAM file of make_cam / make_advcam (`keys`, `cam`, `high_res`) with its contents checked, so a
file of other images, labels or a broken run is one clear line, never a wrong label map."""
import numpy as np

from misc.utils import InputError, load_npz

N_CLASSES = 20
_RERUN = "re-run make_cam / make_advcam for this --infer_list (with --overwrite)"


def read_cam_file(path, maps, label=None, shape=None):
    """(keys (n,) int64, the `maps` array (n, h, w) float32) of the CAM file `path`; InputError naming the
    file unless the keys are distinct class indices 0-19 (those of `label`, the image's (20,) multi-hot
    labels, if given), there is one map per key (of size `shape`, if given) and every value is finite."""
    arrays = load_npz(path)
    for name in ("keys", maps):
        if name not in arrays:
            raise InputError(f"{path} has no '{name}' array (it has {sorted(arrays)}); expected a CAM file of "
                             f"make_cam / make_advcam: re-run that step")
    keys, values = arrays["keys"].reshape(-1), arrays[maps]
    if keys.dtype.kind not in "iu" or keys.size != np.unique(keys).size or ((keys < 0) | (keys >= N_CLASSES)).any():
        raise InputError(f"{path}: keys {keys.tolist()} are not distinct class indices 0-{N_CLASSES - 1}; {_RERUN}")
    if label is not None:
        label_classes = np.nonzero(np.asarray(label).reshape(-1))[0]
        if not np.array_equal(np.sort(keys), label_classes):
            raise InputError(f"{path} holds maps for classes {keys.tolist()} but the image's labels are "
                             f"{label_classes.tolist()}: the CAM files belong to other images or labels; {_RERUN}")
    if values.ndim != 3 or values.shape[0] != keys.size or (shape is not None and values.shape[1:] != tuple(shape)):
        expected = f" at size {tuple(shape)}" if shape is not None else ""
        raise InputError(f"{path}: {maps} {values.shape} is not one map per key ({keys.size}){expected}; "
                         f"the CAMs belong to other images; {_RERUN}")
    if not np.isfinite(values).all():
        raise InputError(f"{path}: {maps} holds non-finite values (NaN / inf): the classifier that made it "
                         f"diverged; retrain it and {_RERUN}")
    return keys.astype(np.int64), values.astype(np.float32, copy=False)


def read_items(voc12_root, cam_dir, ids):
    """(high_res, keys, gt) per id; InputError if a CAM does not match its ground truth's size."""
    import os

    from voc12.dataloader import load_gt, load_image_labels  # voc12 imports torch
    labels = load_image_labels(voc12_root, ids)
    for img_id, label in zip(ids, labels):
        gt = load_gt(voc12_root, img_id)
        keys, high_res = read_cam_file(os.path.join(cam_dir, img_id + ".npz"), "high_res", label, gt.shape)
        yield high_res, keys, gt
