import numpy as np
import pytest

from misc.metrics import cam_to_label, confusion_matrix, scores


def test_confusion_hand_computed_with_ignore_and_accumulation():
    gt1 = np.array([[0, 0, 1],
                    [1, 255, 2]])
    pr1 = np.array([[0, 1, 1],
                    [1, 2, 0]])     # the pixel under gt 255 predicts 2: not counted
    gt2 = np.array([[2, 2]])
    pr2 = np.array([[2, 3]])        # class 3 predicted but absent from the ground truth
    conf = confusion_matrix([pr1, pr2], [gt1, gt2], n_class=5)
    expected = np.zeros((5, 5), np.int64)
    expected[0, 0] = 1
    expected[0, 1] = 1
    expected[1, 1] = 2
    expected[2, 0] = 1
    expected[2, 2] = 1
    expected[2, 3] = 1
    np.testing.assert_array_equal(conf, expected)
    assert conf.dtype == np.int64

    s = scores(conf)
    # IoU_c = N_cc / (row_c + col_c - N_cc)
    np.testing.assert_allclose(s["iou"][:4], [1 / (2 + 2 - 1), 2 / (2 + 3 - 2), 1 / (3 + 1 - 1), 0.0])
    assert np.isnan(s["iou"][4])                       # class 4 absent from both: left out
    assert s["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 3 + 0) / 4)
    np.testing.assert_allclose(s["precision"][:4], [1 / 2, 2 / 3, 1 / 1, 0 / 1])
    np.testing.assert_allclose(s["recall"][:3], [1 / 2, 2 / 2, 1 / 3])
    assert np.isnan(s["recall"][3]) and np.isnan(s["precision"][4])


def test_matches_chainercv_reference_on_random_data():
    """A literal copy of chainercv's dynamic-size algorithm (gt -1 = ignore) gives the same IoUs."""
    rng = np.random.RandomState(0)
    preds, gts = [], []
    for _ in range(4):
        gt = rng.randint(0, 15, size=(9, 11))
        gt[rng.rand(9, 11) < 0.2] = 255
        preds.append(rng.randint(0, 15, size=(9, 11)))
        gts.append(gt)
    n = 0
    ref = np.zeros((0, 0), np.int64)
    for p, g in zip(preds, gts):
        g = np.where(g == 255, -1, g).ravel()
        p = p.ravel()
        lb_max = np.max((p, g))
        if lb_max >= n:
            grown = np.zeros((lb_max + 1, lb_max + 1), np.int64)
            grown[:n, :n] = ref
            n, ref = lb_max + 1, grown
        mask = g >= 0
        ref += np.bincount(n * g[mask] + p[mask], minlength=n ** 2).reshape(n, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        ref_iou = np.diag(ref) / (ref.sum(1) + ref.sum(0) - np.diag(ref))
    ours = scores(confusion_matrix(preds, gts, n_class=21))
    np.testing.assert_allclose(ours["iou"][:n], ref_iou)
    assert np.isnan(ours["iou"][n:]).all()
    assert ours["miou"] == pytest.approx(np.nanmean(ref_iou))


def test_confusion_errors():
    gt = np.zeros((2, 2), np.uint8)
    with pytest.raises(ValueError, match="predictions must be in"):
        confusion_matrix([np.full((2, 2), 255)], [gt])
    # a 255 prediction where the ground truth is ignored is fine
    assert confusion_matrix([np.full((2, 2), 255)], [np.full((2, 2), 255)]).sum() == 0
    with pytest.raises(ValueError, match="ground truth values"):
        confusion_matrix([gt], [np.full((2, 2), 21)])
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix([np.zeros((2, 3))], [gt])
    with pytest.raises(ValueError, match="different lengths"):
        confusion_matrix([gt, gt], [gt])
    with pytest.raises(ValueError, match="2-D"):
        confusion_matrix([np.zeros(4)], [np.zeros(4)])


def test_scores_empty_matrix():
    s = scores(np.zeros((3, 3), np.int64))
    assert np.isnan(s["iou"]).all() and np.isnan(s["miou"])


def test_cam_to_label_threshold_keys_and_ties():
    high_res = np.array([[[0.2, 0.5, 0.1, 0.3]],
                         [[0.6, 0.5, 0.1, 0.3]]], dtype=np.float32)   # keys: classes 3 and 14
    out = cam_to_label(high_res, np.array([3, 14]), 0.3)
    # px0: class 14 wins; px1: tie 0.5/0.5 -> first (class 3); px2: bg; px3: tie with bg 0.3 -> bg
    np.testing.assert_array_equal(out, [[15, 4, 0, 0]])
    assert out.dtype == np.uint8


def test_cam_to_label_bg_has_cam_dtype():
    # float32(0.1) > 0.1 as a double: with a float64 background the CAM would win; as np.pad in the
    # original (bg in the CAMs' dtype) it is a tie, which goes to the background
    high_res = np.array([[[0.1]]], dtype=np.float32)
    assert cam_to_label(high_res, [7], 0.1)[0, 0] == 0
    assert cam_to_label(high_res.astype(np.float64) + 1e-9, [7], 0.1)[0, 0] == 8


def test_cam_to_label_no_keys():
    out = cam_to_label(np.zeros((0, 2, 3), np.float32), np.zeros(0, np.int64), 0.1)
    np.testing.assert_array_equal(out, np.zeros((2, 3), np.uint8))
