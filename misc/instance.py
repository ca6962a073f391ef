"""IRN's instance masks (docs/method.md §9), the maths of IRN's step/make_ins_seg_labels.py.

Per image, from the IRN outputs (boundary `B` (h, w), displacement field `dp` (2, h, w), stride 4) and the
strided CAMs of the image's classes:
1. `find_centroids_with_refinement`: every cell follows the displacement field for `iterations` steps;
2. `cluster_centroids`: the 4-connected regions of weak displacement (|dp| < thres) are the instance
   centres; a cell belongs to the region its centroid lands in -> one-hot instance masks (M, h, w);
3. `separate_score_by_mask`: every class CAM times every instance mask -> C*M seed maps;
4. the random walk of make_sem_seg (misc.indexing.random_walk, docs/method.md §5.3) spreads them;
   `instance_shapes` up-samples, normalises, puts the background score in front and takes the arg-max;
5. `detect_instance`: each 4-connected component of each map's arg-max region is one detection.
`instances_of_image` chains them. Quirks of the release are kept (docs/method.md §9): a cell whose centroid
lands outside every weak region gets "component 0", an instance like the others; components smaller than
`max_fragment_size` pixels are detections of score 0.

Connected components: scipy.ndimage.label with the 4-neighbour structure numbers components in the same
raster order as the release's skimage.measure.label(connectivity=1) (tests/test_instance.py checks it
against a literal flood fill), so instances come out in the release's order.
"""
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from misc import indexing
from misc.utils import InputError, load_npz

FOUR_NEIGHBOURS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)


def label_components(mask):
    """4-connected components of a 2-D bool mask: (labels int32 (h, w), 0 = outside, count), numbered in
    raster order of their first pixel (as skimage.measure.label(connectivity=1, background=0))."""
    labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=FOUR_NEIGHBOURS)
    return labels.astype(np.int32, copy=False), int(count)


def one_hot(values, n_values=None):
    """IRN's pyutils.to_one_hot: (n_values, *values.shape) bool, n_values = max + 1 by default."""
    values = np.asarray(values)
    n_values = int(values.max()) + 1 if n_values is None else int(n_values)
    return np.arange(n_values).reshape((-1,) + (1,) * values.ndim) == values[None]


def compress_range(values):
    """IRN's imutils.compress_range: the distinct values renumbered 0..K-1 in sorted order."""
    uniques, inverse = np.unique(values, return_inverse=True)
    return inverse.reshape(np.shape(values)).astype(np.int32)


# ------------------------------------------------------------------------------------------- centroids

def find_centroids_with_refinement(displacement, iterations=300):
    """Centroid of every cell after `iterations` steps along the displacement field: (2, h, w) int64 (y, x).

    `displacement` (2, h, w) float32 tensor, on any device (the work stays there). The release's numpy loop
    (docs/method.md §9) on all cells and both coordinates at once. Its fractional parts `cy - floor(cy)` come out
    of numpy as float64 (float32 minus int32), so the bilinear look-up and the addition run in float64 and the
    sum is stored back in float32: here the positions are float32 values held in float64, rounded through
    float32 after each step, and the products and sums keep the release's order, so the result is equal bit for
    bit (tests/test_instance.py; bench/centroids.py times the two).
    """
    if displacement.dim() != 3 or displacement.shape[0] != 2:
        raise ValueError(f"displacement must be (2, h, w), got {tuple(displacement.shape)}")
    height, width = displacement.shape[1:]
    device = displacement.device
    n_cells = height * width
    field = displacement.to(torch.float32).reshape(-1).to(torch.float64)  # dy then dx, float32 values exactly
    channel_start = torch.tensor([0, n_cells], device=device).view(2, 1, 1, 1)
    grid = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    position = torch.stack(grid).reshape(2, -1).to(torch.float64)        # (y, x) of every cell: (2, n)
    upper = torch.tensor([[height - 1], [width - 1]], dtype=torch.float64, device=device)
    lower = torch.zeros_like(upper)
    # the large per-step arrays reuse their memory (fresh allocations of this size cost page faults on a CPU)
    both_channels = torch.empty(2, 2, 2, n_cells, dtype=torch.int64, device=device)
    looked_up = torch.empty(2, 2, 2, n_cells, dtype=torch.float64, device=device)
    terms = torch.empty_like(looked_up)
    for _ in range(iterations):
        low = torch.floor(position)
        frac = position - low                       # exact: the release's float64 y_c, x_c
        low_index = low.to(torch.int64)
        corner = torch.stack([low_index + (frac > 0), low_index])  # [ceil / floor, y / x, n]; ceil = floor + [f > 0]
        # flat index of (y of ysel, x of xsel) as [xsel, ysel, n]: the release's corners (uy, ux), (dy, ux),
        # (uy, dx), (dy, dx) are [0, 0], [0, 1], [1, 0], [1, 1]; then both channels of the field at once
        index = corner[:, None, 1] + corner[None, :, 0] * width
        torch.add(index, channel_start, out=both_channels)
        torch.index_select(field, 0, both_channels.view(-1), out=looked_up.view(-1))
        weight = torch.stack([frac, 1 - frac])      # [ceil / floor, y / x, n]: f at the ceil corner, 1 - f at the floor
        torch.mul(looked_up, weight[None, None, :, 0], out=terms)
        terms.mul_(weight[None, :, None, 1])        # (d * wy) * wx, as written
        step = terms[:, 0, 0] + terms[:, 0, 1] + terms[:, 1, 0] + terms[:, 1, 1]  # left to right, as written
        position = (position + step).to(torch.float32).to(torch.float64)       # the release's float32 positions
        position = torch.clamp(position, min=lower, max=upper)
    return torch.round(position).to(torch.int64).reshape(2, height, width)


def cluster_centroids(centroids, displacement, thres=2.5):
    """One-hot instance masks (M, h, w) bool (numpy): cells grouped by the weak-displacement region their
    centroid lands in.

    weak = sqrt(dp1^2 + dp0^2) < thres (float32, as the release); its 4-connected components are labelled
    1..K (0: not weak); each cell takes the label at its centroid; the labels used are renumbered 0..M-1 in
    sorted order (a cell whose centroid is not in a weak region takes label 0, the first instance when any).
    `centroids` (2, h, w) integer and `displacement` (2, h, w): numpy arrays or tensors.
    """
    centroids = _numpy(centroids).astype(np.int64)
    displacement = _numpy(displacement).astype(np.float32)
    strength = np.sqrt(displacement[1] ** 2 + displacement[0] ** 2)
    height, width = strength.shape
    region, _ = label_components(strength < thres)
    cluster = region.reshape(-1)[centroids[0] * width + centroids[1]]
    return one_hot(compress_range(cluster.reshape(height, width) + 1))


def _numpy(array):
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


# ------------------------------------------------------------------------------------------------ scores

def separate_score_by_mask(scores, masks):
    """Every class map times every instance mask: (C, M, h, w) on the scores' device and dtype.

    `scores` (C, h, w) tensor, `masks` (M, h, w) bool (numpy or tensor).
    """
    masks = torch.as_tensor(masks, device=scores.device).to(scores.dtype)
    return scores.unsqueeze(1) * masks.unsqueeze(0)


def instance_shapes(walked, image_size, bg_thres, stride=4):
    """(score maps (n, H, W) float32 numpy, arg-max regions (n, H, W) bool numpy) of the walked maps (n, h, w).

    Up-sample x`stride` (bilinear, align_corners=False), crop to `image_size`, divide by the global maximum;
    a constant background map `bg_thres` in front; arg-max (ties to the first); one-hot over the n + 1 maps,
    background dropped (docs/method.md §9).
    """
    height, width = image_size
    up = F.interpolate(walked.unsqueeze(1), scale_factor=stride, mode="bilinear",
                       align_corners=False)[:, 0, :height, :width]
    up = up / torch.max(up)
    index = torch.argmax(F.pad(up, (0, 0, 0, 0, 1, 0), value=bg_thres), dim=0)
    shapes = torch.arange(1, walked.shape[0] + 1, device=index.device)[:, None, None] == index[None]
    return up.cpu().numpy(), shapes.cpu().numpy()


def empty_detections(image_size):
    """No detection: score (0,) float32, mask (0, H, W) bool, class (0,) int64 (the release would crash)."""
    return {"score": np.zeros(0, np.float32), "mask": np.zeros((0,) + tuple(image_size), bool),
            "class": np.zeros(0, np.int64)}


def detect_instance(score_map, mask, class_id, max_fragment_size=0):
    """Detections of the (score map, region, class) triples: one per 4-connected component of each region.

    A component's score is max(score map * component), or 0 when it has fewer than `max_fragment_size`
    pixels; its class is the triple's. Returns {"score": (N,) float32, "mask": (N, H, W) bool, "class": (N,)
    int64}, in the release's order (triples in order, components in raster order); N = 0 gives empty arrays.
    """
    score_map, mask = np.asarray(score_map), np.asarray(mask, dtype=bool)
    scores, masks, classes = [], [], []
    for region_score, region, region_class in zip(score_map, mask, np.asarray(class_id).reshape(-1)):
        if not region.any():
            continue
        labels, count = label_components(region)
        for component in range(1, count + 1):
            segment = labels == component
            if segment.sum() < max_fragment_size:
                scores.append(0.0)
            else:
                scores.append(np.max(region_score * segment))
            masks.append(segment)
            classes.append(region_class)
    if not masks:
        return empty_detections(mask.shape[1:])
    return {"score": np.asarray(scores, dtype=np.float32), "mask": np.stack(masks),
            "class": np.asarray(classes, dtype=np.int64)}


def instances_of_image(cam, keys, boundary, displacement, image_size, *, bg_thres=0.25, beta=10, exp_times=8,
                       radius=5, centroid_iterations=300, cluster_thres=2.5, fragment_fraction=0.01):
    """The detections of one image (docs/method.md §9): see the module docstring.

    `cam` (C, h, w) tensor of the classes `keys` (C,), `boundary` (h, w) and `displacement` (2, h, w)
    tensors of the IRN, all on one device; `image_size` (H, W). Returns detect_instance's dict.
    """
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    if keys.size == 0:  # nothing to spread (the release's torch.max of nothing would crash)
        return empty_detections(image_size)
    centroids = find_centroids_with_refinement(displacement, centroid_iterations)
    masks = cluster_centroids(centroids, displacement, cluster_thres)
    seeds = separate_score_by_mask(cam, masks)
    n_classes, n_instances = seeds.shape[:2]
    seeds = seeds.reshape(n_classes * n_instances, *seeds.shape[2:])
    walked = indexing.random_walk(seeds, boundary, radius, beta, exp_times)
    score_maps, shapes = instance_shapes(walked, image_size, bg_thres)
    classes = np.repeat(keys, n_instances)  # class-major: every instance of keys[0], then keys[1], ...
    height, width = image_size
    return detect_instance(score_maps, shapes, classes, max_fragment_size=height * width * fragment_fraction)


def read_detections(path):
    """The detections dict of an instance file; InputError naming it unless its arrays fit together."""
    arrays = load_npz(path)
    if not {"score", "mask", "class"} <= set(arrays):
        raise InputError(f"{path} has {sorted(arrays)}, not the score / mask / class arrays of make_ins_seg: "
                         f"re-run make_ins_seg (with --overwrite)")
    score, mask, classes = arrays["score"], arrays["mask"], arrays["class"]
    if mask.ndim != 3 or mask.dtype != bool or score.shape != (len(mask),) or classes.shape != (len(mask),):
        raise InputError(f"{path}: mask {mask.shape} {mask.dtype}, score {score.shape}, class {classes.shape} do not "
                         f"describe N detections; re-run make_ins_seg (with --overwrite)")
    return {"score": score, "mask": mask, "class": classes}
