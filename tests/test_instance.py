"""Instance masks (misc/instance.py, docs/method.md §9): the vectorised maths equals literal transcriptions of
the release's loops (IRN's step/make_ins_seg_labels.py, misc/imutils.py, misc/pyutils.py)."""
import collections

import numpy as np
import pytest
import torch

from misc import indexing, instance

# ------------------------------------------------------------------------ the release, transcribed literally

def release_find_centroids_with_refinement(displacement, iterations=300):
    height, width = displacement.shape[1:3]
    centroid_y = np.repeat(np.expand_dims(np.arange(height), 1), width, axis=1).astype(np.float32)
    centroid_x = np.repeat(np.expand_dims(np.arange(width), 0), height, axis=0).astype(np.float32)
    for i in range(iterations):
        uy = np.ceil(centroid_y).astype(np.int32)
        dy = np.floor(centroid_y).astype(np.int32)
        y_c = centroid_y - dy
        ux = np.ceil(centroid_x).astype(np.int32)
        dx = np.floor(centroid_x).astype(np.int32)
        x_c = centroid_x - dx
        centroid_y += displacement[0][uy, ux] * y_c * x_c + \
            displacement[0][dy, ux] * (1 - y_c) * x_c + \
            displacement[0][uy, dx] * y_c * (1 - x_c) + \
            displacement[0][dy, dx] * (1 - y_c) * (1 - x_c)
        centroid_x += displacement[1][uy, ux] * y_c * x_c + \
            displacement[1][dy, ux] * (1 - y_c) * x_c + \
            displacement[1][uy, dx] * y_c * (1 - x_c) + \
            displacement[1][dy, dx] * (1 - y_c) * (1 - x_c)
        centroid_y = np.clip(centroid_y, 0, height - 1)
        centroid_x = np.clip(centroid_x, 0, width - 1)
    centroid_y = np.round(centroid_y).astype(np.int32)
    centroid_x = np.round(centroid_x).astype(np.int32)
    return np.stack([centroid_y, centroid_x], axis=0)


def flood_fill_label(mask):
    """skimage.measure.label(mask, connectivity=1, background=0) by its definition: components numbered
    1, 2, ... in raster order of their first pixel."""
    height, width = mask.shape
    labels = np.zeros((height, width), np.int64)
    count = 0
    for y in range(height):
        for x in range(width):
            if mask[y, x] and not labels[y, x]:
                count += 1
                labels[y, x] = count
                queue = collections.deque([(y, x)])
                while queue:
                    cy, cx = queue.popleft()
                    for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                        if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                            labels[ny, nx] = count
                            queue.append((ny, nx))
    return labels


def release_to_one_hot(sparse_integers, maximum_val=None, dtype=bool):
    if maximum_val is None:
        maximum_val = np.max(sparse_integers) + 1
    src_shape = sparse_integers.shape
    flat_src = np.reshape(sparse_integers, [-1])
    src_size = flat_src.shape[0]
    one_hot = np.zeros((maximum_val, src_size), dtype)
    one_hot[flat_src, np.arange(src_size)] = 1
    return np.reshape(one_hot, [maximum_val] + list(src_shape))


def release_compress_range(arr):
    uniques = np.unique(arr)
    maximum = np.max(uniques)
    d = np.zeros(maximum + 1, np.int32)
    d[uniques] = np.arange(uniques.shape[0])
    out = d[arr]
    return out - np.min(out)


def release_cluster_centroids(centroids, displacement, thres=2.5):
    dp_strength = np.sqrt(displacement[1] ** 2 + displacement[0] ** 2)
    height, width = dp_strength.shape
    weak_dp_region = dp_strength < thres
    dp_label = flood_fill_label(weak_dp_region)
    dp_label_1d = dp_label.reshape(-1)
    centroids_1d = centroids[0] * width + centroids[1]
    clusters_1d = dp_label_1d[centroids_1d]
    cluster_map = release_compress_range(clusters_1d.reshape(height, width) + 1)
    return release_to_one_hot(cluster_map)


def release_detect_instance(score_map, mask, class_id, max_fragment_size=0):
    pred_score, pred_label, pred_mask = [], [], []
    for ag_score, ag_mask, ag_class in zip(score_map, mask, class_id):
        if np.sum(ag_mask) < 1:
            continue
        segments = release_to_one_hot(flood_fill_label(ag_mask))[1:]
        for seg_mask in segments:
            if np.sum(seg_mask) < max_fragment_size:
                pred_score.append(0)
            else:
                pred_score.append(np.max(ag_score * seg_mask))
            pred_label.append(ag_class)
            pred_mask.append(seg_mask)
    return {"score": np.stack(pred_score, 0), "mask": np.stack(pred_mask, 0), "class": np.stack(pred_label, 0)}


# --------------------------------------------------------------------------------------------------- fields

def instance_field(height, width, centres, rng, noise=0.3):
    """A displacement field pointing every cell to the nearest of `centres` (y, x), plus noise: float32."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    centres = np.asarray(centres, np.float32)
    distance = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    nearest = centres[np.argmin(distance, axis=0)]
    field = np.stack([nearest[..., 0] - yy, nearest[..., 1] - xx])
    return (field + rng.normal(0, noise, field.shape)).astype(np.float32)


@pytest.mark.parametrize("height,width,iterations,kind", [(13, 17, 300, "random"), (20, 9, 50, "random"),
                                                          (24, 31, 300, "instances"), (1, 6, 20, "random")])
def test_centroids_equal_the_release_loop_bit_for_bit(height, width, iterations, kind):
    rng = np.random.default_rng(height * width)
    if kind == "random":  # steps of several cells, clipped at the borders, fractional positions everywhere
        field = (rng.normal(0, 3, (2, height, width))).astype(np.float32)
    else:
        field = instance_field(height, width, [(4, 5), (18, 25), (12, 14)], rng)
    expected = release_find_centroids_with_refinement(field.copy(), iterations)
    got = instance.find_centroids_with_refinement(torch.from_numpy(field), iterations)
    assert got.shape == (2, height, width) and got.dtype == torch.int64
    assert np.array_equal(got.numpy(), expected)
    assert expected.min() >= 0 and expected[0].max() <= height - 1 and expected[1].max() <= width - 1
    if kind == "instances":  # the cells of each region gather at its centre
        assert set(map(tuple, expected.reshape(2, -1).T.tolist())) <= {(4, 5), (18, 25), (12, 14), (4, 4), (4, 6),
                                                                       (3, 5), (5, 5), (18, 24), (18, 26), (17, 25),
                                                                       (19, 25), (12, 13), (12, 15), (11, 14),
                                                                       (13, 14)}


def test_centroids_in_float32_would_differ_so_the_float64_steps_matter():
    """The release's fractional parts are float64 (float32 - int32 in numpy): a float32-only version of the
    loop drifts away from it, so the equality above is a real check of the arithmetic."""
    rng = np.random.default_rng(3)
    field = (rng.normal(0, 3, (2, 30, 40))).astype(np.float32)
    expected = release_find_centroids_with_refinement(field.copy(), 300)
    cy, cx = np.mgrid[0:30, 0:40].astype(np.float32)
    for _ in range(300):
        dy, dx = np.floor(cy), np.floor(cx)
        fy, fx = cy - dy, cx - dx
        uy, ux, dy, dx = (np.ceil(cy).astype(int), np.ceil(cx).astype(int), dy.astype(int), dx.astype(int))
        look = lambda d: d[uy, ux] * fy * fx + d[dy, ux] * (1 - fy) * fx + d[uy, dx] * fy * (1 - fx) + \
            d[dy, dx] * (1 - fy) * (1 - fx)
        cy, cx = np.clip(cy + look(field[0]), 0, 29), np.clip(cx + look(field[1]), 0, 39)
    assert cy.dtype == np.float32
    float32_only = np.stack([np.round(cy), np.round(cx)]).astype(np.int32)
    assert not np.array_equal(float32_only, expected)


def test_scipy_labels_number_components_as_skimage_does():
    rng = np.random.default_rng(0)
    for trial in range(60):
        height, width = rng.integers(1, 25, 2)
        mask = rng.random((height, width)) < rng.uniform(0.2, 0.8)
        labels, count = instance.label_components(mask)
        expected = flood_fill_label(mask)
        assert np.array_equal(labels, expected) and count == expected.max()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cluster_centroids_equals_the_release(seed):
    rng = np.random.default_rng(seed)
    height, width = 22, 27
    field = instance_field(height, width, [(3, 3), (15, 20), (10, 8)], rng, noise=0.8)
    field[:, :2, :] = rng.normal(0, 6, (2, 2, width))  # strong noise: some centroids land off weak regions
    centroids = release_find_centroids_with_refinement(field.copy(), 100)
    expected = release_cluster_centroids(centroids, field)
    got = instance.cluster_centroids(torch.from_numpy(centroids.astype(np.int64)), torch.from_numpy(field))
    assert got.dtype == bool and got.shape == expected.shape and np.array_equal(got, expected)
    assert (got.sum(axis=0) == 1).all() and got.shape[0] >= 3


def test_cluster_centroids_on_a_hand_made_field():
    """Two weak regions (left, right columns) split by strong cells; the middle column's centroids land in
    neither region (label 0), which becomes instance 0 of three, in sorted order of the labels + 1."""
    displacement = np.zeros((2, 2, 5), np.float32)
    displacement[1, :, 2] = 3.0   # |dp| = 3 >= 2.5: not weak
    centroids = np.stack(np.mgrid[0:2, 0:5])
    masks = instance.cluster_centroids(centroids, displacement, thres=2.5)
    assert masks.shape == (3, 2, 5)
    assert np.array_equal(masks[0], np.array([[0, 0, 1, 0, 0]] * 2, bool))       # not weak (label 0 + 1 = 1)
    assert np.array_equal(masks[1], np.array([[1, 1, 0, 0, 0]] * 2, bool))       # first component (2)
    assert np.array_equal(masks[2], np.array([[0, 0, 0, 1, 1]] * 2, bool))       # second component (3)
    # every centroid in the right region: one instance; none in label 0, so it is not an instance
    right = np.stack([np.zeros((2, 5), int), np.full((2, 5), 4)])
    only = instance.cluster_centroids(right, displacement)
    assert only.shape == (1, 2, 5) and only.all()


def test_separate_score_by_mask():
    scores = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    masks = np.zeros((2, 3, 4), bool)
    masks[0, :, :2] = True
    masks[1, :, 2:] = True
    out = instance.separate_score_by_mask(scores, masks)
    assert out.shape == (2, 2, 3, 4) and out.dtype == torch.float32
    assert torch.equal(out[1, 0], torch.where(torch.from_numpy(masks[0]), scores[1], torch.zeros(())))
    assert torch.equal(out[0, 0] + out[0, 1], scores[0])


def test_detect_instance_on_hand_made_masks():
    """Map 0: two components (a 6-pixel block and a 1-pixel fragment); map 1: empty; map 2: one component
    touching map 0's block diagonally (4-connectivity keeps them apart anyway)."""
    score = np.zeros((3, 6, 6), np.float32)
    score[0] = np.arange(36, dtype=np.float32).reshape(6, 6) / 100
    score[2] = 0.5
    mask = np.zeros((3, 6, 6), bool)
    mask[0, 0:2, 0:3] = True       # 6 pixels
    mask[0, 5, 5] = True           # 1 pixel: below max_fragment_size 2 -> score 0
    mask[2, 2:4, 3:6] = True       # 6 pixels
    classes = np.array([7, 3, 14])
    det = instance.detect_instance(score, mask, classes, max_fragment_size=2)
    assert det["score"].dtype == np.float32 and det["mask"].dtype == bool and det["class"].dtype == np.int64
    assert det["score"].tolist() == [np.float32(0.08), 0.0, 0.5]  # max of the block: score[0][1, 2] = 0.08
    assert det["class"].tolist() == [7, 7, 14]
    assert np.array_equal(det["mask"][0], mask[0] & (np.arange(6)[:, None] < 2))
    assert det["mask"][1].sum() == 1 and det["mask"][1][5, 5]
    assert np.array_equal(det["mask"][2], mask[2])
    # a fragment limit above every component: all scores 0; no region at all: empty arrays, not a crash
    assert instance.detect_instance(score, mask, classes, max_fragment_size=7)["score"].tolist() == [0, 0, 0]
    empty = instance.detect_instance(score, np.zeros_like(mask), classes)
    assert empty["score"].shape == (0,) and empty["mask"].shape == (0, 6, 6) and empty["class"].shape == (0,)


def test_detect_instance_equals_the_release_on_random_maps():
    rng = np.random.default_rng(5)
    score = rng.random((4, 20, 23)).astype(np.float32)
    index = rng.integers(0, 5, (20, 23))
    index[5:12, 4:15] = 2
    mask = np.arange(1, 5)[:, None, None] == index[None]
    classes = np.array([2, 2, 11, 11])
    expected = release_detect_instance(score, mask, classes, max_fragment_size=20 * 23 * 0.01)
    got = instance.detect_instance(score, mask, classes, max_fragment_size=20 * 23 * 0.01)
    assert np.array_equal(got["mask"], expected["mask"]) and np.array_equal(got["class"], expected["class"])
    assert np.array_equal(got["score"], expected["score"].astype(np.float32))
    assert (got["score"] == 0).any() and (got["score"] > 0).any()


def test_instance_shapes_background_and_arg_max():
    walked = torch.zeros(2, 2, 3)
    walked[0, 0, 0] = 4.0
    walked[1, 1, 2] = 2.0
    scores, shapes = instance.instance_shapes(walked, (7, 10), bg_thres=0.25)
    assert scores.shape == shapes.shape == (2, 7, 10) and scores.max() == 1.0
    assert shapes[0, 0, 0] and shapes[1, 6, 9] and not (shapes[0] & shapes[1]).any()
    assert not shapes[:, 3, 5].any()   # far from both seeds: background
    # a background score of 1 wins every tie: nothing
    assert not instance.instance_shapes(walked, (7, 10), bg_thres=1.0)[1].any()


def release_instances(cam, keys, boundary, dp, size, bg_thres, radius, beta, exp_times):
    """The release's per-image body (numpy + the dense walk of the original), for the chain test."""
    centroids = release_find_centroids_with_refinement(dp.numpy(), 300)
    instance_map = release_cluster_centroids(centroids, dp.numpy())
    instance_cam = cam.unsqueeze(1) * torch.from_numpy(instance_map.astype(np.float32))
    rw = indexing.dense_random_walk(instance_cam.reshape(-1, *cam.shape[1:]), boundary, radius, beta, exp_times)
    rw_up = torch.nn.functional.interpolate(rw.unsqueeze(1), scale_factor=4, mode="bilinear",
                                            align_corners=False)[:, 0, :size[0], :size[1]]
    rw_up = rw_up / torch.max(rw_up)
    rw_up_bg = torch.nn.functional.pad(rw_up, (0, 0, 0, 0, 1, 0), value=bg_thres)
    num_instances = instance_map.shape[0]
    instance_shape = torch.argmax(rw_up_bg, 0).numpy()
    instance_shape = release_to_one_hot(instance_shape, maximum_val=num_instances * len(keys) + 1)[1:]
    instance_class_id = np.repeat(keys, num_instances)
    return release_detect_instance(rw_up.numpy(), instance_shape, instance_class_id,
                                   max_fragment_size=size[0] * size[1] * 0.01)


def test_instances_of_image_follows_the_release_chain():
    rng = np.random.default_rng(11)
    h, w, size = 12, 14, (45, 53)
    dp = torch.from_numpy(instance_field(h, w, [(3, 3), (8, 10)], rng, noise=0.2))
    boundary = torch.full((h, w), 0.05)
    boundary[:, 6] = 0.9   # the two objects are separated by a boundary
    cam = torch.zeros(2, h, w)
    cam[0, 1:6, 1:6] = 1.0
    cam[1, 5:11, 8:13] = 0.8
    keys = np.array([4, 9])
    got = instance.instances_of_image(cam, keys, boundary, dp, size, bg_thres=0.25, radius=5, beta=10, exp_times=8)
    expected = release_instances(cam, keys, boundary, dp, size, 0.25, 5, 10, 8)
    assert np.array_equal(got["class"], expected["class"]) and np.array_equal(got["mask"], expected["mask"])
    np.testing.assert_allclose(got["score"], expected["score"], rtol=1e-4, atol=1e-6)
    # class 4 (the top-left object) and class 9 (the right one) are detected where their CAMs are
    best = {c: got["mask"][got["class"] == c][np.argmax(got["score"][got["class"] == c])] for c in (4, 9)}
    assert best[4][10, 10] and best[9][30, 42] and not best[4][30, 42]
    assert got["score"].max() == pytest.approx(1.0)
    # no class: empty arrays
    none = instance.instances_of_image(cam[:0], np.zeros(0, np.int64), boundary, dp, size)
    assert none["mask"].shape == (0, 45, 53)
