"""Dense CRF refinement of hard label maps (docs/method.md §5.1), IRN's imutils.crf_inference_label.

Kraehenbuehl & Koltun's fully connected CRF through pydensecrf (package pydensecrf2). The constants
are the method's (docs/method.md; the same in IRN and W-OoD); they are not tuned per run, hence not driver flags.
"""
import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels

GT_PROB = 0.7          # confidence of the hard labels in the unary
GAUSSIAN_SXY = 3
GAUSSIAN_COMPAT = 3
BILATERAL_SXY = 50
BILATERAL_SRGB = 5
BILATERAL_COMPAT = 10
N_ITERATIONS = 10


def crf_inference_label(img, labels, n_labels, t=N_ITERATIONS, gt_prob=GT_PROB):
    """Refine `labels` (H, W) ints in [0, n_labels) on the RGB uint8 image (H, W, 3): (H, W) int64.

    Unary from the hard labels (probability `gt_prob`, no "unsure" label), pairwise Gaussian
    (sxy 3, compat 3) and bilateral (sxy 50, srgb 5, compat 10), `t` mean-field iterations, arg-max.
    """
    img = np.asarray(img)
    labels = np.asarray(labels)
    h, w = img.shape[:2]
    if labels.shape != (h, w):
        raise ValueError(f"labels {labels.shape} and image {img.shape} differ in size")
    if n_labels == 1:  # one label only: nothing to refine (the unary would divide by zero)
        return np.zeros((h, w), dtype=np.int64)
    d = dcrf.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(unary_from_labels(labels, n_labels, gt_prob=gt_prob, zero_unsure=False))
    d.addPairwiseGaussian(sxy=GAUSSIAN_SXY, compat=GAUSSIAN_COMPAT)
    d.addPairwiseBilateral(sxy=BILATERAL_SXY, srgb=BILATERAL_SRGB,
                           rgbim=np.ascontiguousarray(np.copy(img)), compat=BILATERAL_COMPAT)
    q = d.inference(t)
    return np.argmax(np.array(q).reshape((n_labels, h, w)), axis=0)
