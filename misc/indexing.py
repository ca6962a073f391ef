"""Pixel-pair indexing of IRN (docs/method.md §5.2, 5.3), as IRN's misc/indexing.py.

Grid conventions: maps are (h, w), flattened row-major (index = y * w + x). A direction d = (dy, dx)
joins a source pixel p to its destination p + d. Directions are D(r) = {(0, x): 1 <= x < r} U
{(y, x): 1 <= y < r, -r < x < r, x^2 + y^2 < r^2}; they point "forward" only (dy > 0, or dy == 0 and
dx > 0), so every unordered pair of pixels closer than r appears exactly once.

Two users:
- training (`PathIndex`, `edge_to_affinity`, `affinity_labels`, `pair_displacement`): pairs of every
  source pixel whose destinations all lie inside the map (rows [0, h - rf), columns [rf, w - rf),
  rf = ceil(r) - 1), directions grouped by path length as IRN orders them;
- the random walk (`walk_pairs`, `sparse_transition`): every pair with both ends inside the map,
  turned into the column-normalised transition matrix as a torch sparse matrix.
`dense_random_walk` is the original's dense formulation (O((hw)^2) memory), kept as the reference
that tests and bench/random_walk.py compare the sparse walk with.
"""
import contextlib
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------- directions, paths

def search_directions(radius):
    """D(radius) as a list of (dy, dx), in IRN's generation order."""
    r = int(radius)
    dirs = [(0, x) for x in range(1, r)]
    dirs += [(y, x) for y in range(1, r) for x in range(-r + 1, r) if x * x + y * y < radius ** 2]
    return dirs


def direction_path(direction):
    """P(d): the integer points of the box between (0, 0) and d within distance 1 of the segment.

    Both end points are included; sorted farthest first (by -|y|-|x|, stable), so path[0] == d.
    """
    dy, dx = direction
    length_sq = dy * dy + dx * dx
    min_y, max_y = sorted((0, dy))
    min_x, max_x = sorted((0, dx))
    path = [(y, x) for y in range(min_y, max_y + 1) for x in range(min_x, max_x + 1)
            if (dy * x - dx * y) ** 2 / length_sq < 1]
    path.sort(key=lambda q: -abs(q[0]) - abs(q[1]))
    return path


def radius_floor(radius):
    return int(math.ceil(radius) - 1)


class PathIndex:
    """IRN's PathIndex: directions grouped by path length and flat pixel indices for a (h, w) map.

    Attributes:
    - `search_paths`: list over path lengths of int arrays (n_dirs_of_that_length, length, 2);
    - `search_dst`: (n_dirs, 2) directions in that grouped order (the order of every pair tensor);
    - `path_indices`: list of int64 arrays (n_dirs_of_that_length, length, n_src): flat index of
      p + q for each direction, path point q and source p;
    - `src_indices` (n_src,), `dst_indices` (n_dirs, n_src): flat indices of p and p + d.
    """

    def __init__(self, radius, default_size):
        self.radius = radius
        self.radius_floor = radius_floor(radius)
        self.search_paths, self.search_dst = self._search_paths_dst(radius)
        self.size = tuple(int(s) for s in default_size)
        self.path_indices, self.src_indices, self.dst_indices = self.get_path_indices(self.size)

    @staticmethod
    def _search_paths_dst(radius):
        by_length = {}
        for d in search_directions(radius):
            path = direction_path(d)
            by_length.setdefault(len(path), []).append(path)
        paths = [np.asarray(by_length[n], dtype=np.int64) for n in sorted(by_length)]
        return paths, np.concatenate([p[:, 0] for p in paths], axis=0)

    def source_box(self, size):
        """(rows, columns) of the source pixels: every destination of such a pixel is inside the map."""
        height, width = size
        rf = self.radius_floor
        if height - rf <= 0 or width - 2 * rf <= 0:
            raise ValueError(f"a {height}x{width} map has no source pixel for radius {self.radius}")
        return height - rf, width - 2 * rf

    def get_path_indices(self, size):
        height, width = size
        full = np.arange(height * width, dtype=np.int64).reshape(height, width)
        src_h, src_w = self.source_box(size)
        rf = self.radius_floor

        def shifted(dy, dx):  # flat indices of p + (dy, dx) over the source box
            return full[dy:dy + src_h, rf + dx:rf + dx + src_w].reshape(-1)

        path_indices = [np.stack([np.stack([shifted(dy, dx) for dy, dx in path]) for path in paths])
                        for paths in self.search_paths]
        src_indices = shifted(0, 0)
        dst_indices = np.concatenate([p[:, 0] for p in path_indices], axis=0)
        return path_indices, src_indices, dst_indices


# ------------------------------------------------------------------------------------ training pairs

def edge_to_affinity(edge, path_indices):
    """Affinity 1 - max_{q in P(d)} B(p + q) for every (direction, source): (B, n_dirs, n_src).

    `edge` is (B, h, w) or (B, 1, h, w) boundary probabilities; `path_indices` those of a PathIndex
    built for (h, w) (numpy or torch). The max is F.max_pool2d as in IRN (its gradient goes to one
    maximum when several are equal).
    """
    edge = edge.reshape(edge.size(0), -1)
    aff_list = []
    for ind in path_indices:
        ind = torch.as_tensor(ind, device=edge.device)
        dist = torch.index_select(edge, dim=-1, index=ind.reshape(-1))
        dist = dist.view(dist.size(0), ind.size(0), ind.size(1), ind.size(2))
        aff_list.append(torch.squeeze(1 - F.max_pool2d(dist, (dist.size(2), 1)), dim=2))
    return torch.cat(aff_list, dim=1)


def affinity_labels(label_map, src_indices, dst_indices, n_valid=21):
    """Affinity labels of an IR label map: float32 (bg_pos, fg_pos, neg), each (n_dirs, n_src).

    valid = L(p) < n_valid and L(p + d) < n_valid (255 = unsure); bg_pos = valid, both 0;
    fg_pos = valid, equal and > 0; neg = valid and different.
    """
    flat = np.asarray(label_map).reshape(-1)
    label_from = flat[src_indices][None, :]
    label_to = flat[dst_indices]
    valid = (label_from < n_valid) & (label_to < n_valid)
    equal = label_from == label_to
    pos = equal & valid
    bg_pos = (pos & (label_from == 0)).astype(np.float32)
    fg_pos = (pos & (label_from > 0)).astype(np.float32)
    neg = (~equal & valid).astype(np.float32)
    return bg_pos, fg_pos, neg


class GetAffinityLabelFromIndices:
    """IRN's callable: label map -> (bg_pos, fg_pos, neg) torch tensors (n_dirs, n_src)."""

    def __init__(self, indices_from, indices_to):
        self.indices_from = indices_from
        self.indices_to = indices_to

    def __call__(self, segm_map):
        return tuple(torch.from_numpy(a) for a in affinity_labels(segm_map, self.indices_from,
                                                                  self.indices_to))


def pair_displacement(disp, path_index):
    """disp(p) - disp(p + d) for every source p and direction d: (B, 2, n_dirs, n_src)."""
    height, width = disp.size(2), disp.size(3)
    src_h, src_w = path_index.source_box((height, width))
    rf = path_index.radius_floor
    disp_src = disp[:, :, :src_h, rf:rf + src_w]
    disp_dst = torch.stack([disp[:, :, dy:dy + src_h, rf + dx:rf + dx + src_w]
                            for dy, dx in path_index.search_dst.tolist()], 2)
    pair = torch.unsqueeze(disp_src, 2) - disp_dst
    return pair.reshape(pair.size(0), pair.size(1), pair.size(2), -1)


# ------------------------------------------------------------------------------------- random walk

def _forward_affinity(boundary, direction):
    """Affinity of every in-map pair (p, p + d) as a (rows, cols) map over the sources, and the source
    box (rows, x_lo, x_hi); None when no pair fits."""
    height, width = boundary.shape
    dy, dx = direction
    rows, x_lo, x_hi = height - dy, max(0, -dx), width - max(0, dx)
    if rows <= 0 or x_hi <= x_lo:
        return None
    path_max = torch.stack([boundary[qy:qy + rows, x_lo + qx:x_hi + qx]
                            for qy, qx in direction_path(direction)]).amax(0)
    return 1 - path_max, (rows, x_lo, x_hi)


def walk_pairs(boundary, radius):
    """All pixel pairs (p, p + d), d in D(radius), with both ends in the (h, w) map, and their affinity.

    Returns flat `src`, `dst` (int64) and `aff` = 1 - max_{q in P(d)} B(p + q), all (n_pairs,).
    """
    height, width = boundary.shape
    full = torch.arange(height * width, device=boundary.device).view(height, width)
    src, dst, aff = [], [], []
    for dy, dx in search_directions(radius):
        found = _forward_affinity(boundary, (dy, dx))
        if found is None:
            continue
        pair_aff, (rows, x_lo, x_hi) = found
        src.append(full[:rows, x_lo:x_hi].reshape(-1))
        dst.append(full[dy:dy + rows, x_lo + dx:x_hi + dx].reshape(-1))
        aff.append(pair_aff.reshape(-1))
    if not src:
        empty = torch.zeros(0, dtype=torch.int64, device=boundary.device)
        return empty, empty, boundary.new_zeros(0)
    return torch.cat(src), torch.cat(dst), torch.cat(aff)


_CSR_CHUNK_ROWS = 1024


def sparse_transition(boundary, radius, beta):
    """T of docs/method.md §5.3, transposed, as a sparse CSR tensor (hw, hw) with int32 indices.

    A = identity + the affinity of every in-map pair in both orders; T = A ** beta with each column
    divided by its sum. `R @ T` is computed as `(T^T @ R^T)^T`, hence T^T. W = A ** beta is symmetric,
    so T^T = diag(1 / row sums of W) @ W: row j of T^T holds W[j, j + o] / sum_o W[j, j + o] over the
    stencil offsets o (0, +d, -d for d in D(radius)). Built directly in CSR order (offsets sorted by
    (dy, dx) give ascending columns), without a COO sort, so its memory stays a few times the nnz.
    """
    height, width = boundary.shape
    n = height * width
    offsets = sorted({(0, 0)} | {d for d in search_directions(radius)} |
                     {(-dy, -dx) for dy, dx in search_directions(radius)})
    weights = boundary.new_zeros(height, width, len(offsets))  # W[p, p + o], 0 outside the map
    valid = torch.zeros(height, width, len(offsets), dtype=torch.bool, device=boundary.device)
    column = {o: k for k, o in enumerate(offsets)}
    weights[:, :, column[(0, 0)]] = 1
    valid[:, :, column[(0, 0)]] = True
    for dy, dx in search_directions(radius):
        found = _forward_affinity(boundary, (dy, dx))
        if found is None:
            continue
        pair_aff, (rows, x_lo, x_hi) = found
        pair_weight = pair_aff ** beta
        forward, backward = column[(dy, dx)], column[(-dy, -dx)]
        weights[:rows, x_lo:x_hi, forward] = pair_weight  # source p, neighbour p + d
        valid[:rows, x_lo:x_hi, forward] = True
        weights[dy:dy + rows, x_lo + dx:x_hi + dx, backward] = pair_weight  # source p + d, neighbour p
        valid[dy:dy + rows, x_lo + dx:x_hi + dx, backward] = True
    weights, valid = weights.view(n, -1), valid.view(n, -1)
    weights /= weights.sum(dim=1, keepdim=True)
    crow_indices = torch.zeros(n + 1, dtype=torch.int32, device=boundary.device)
    crow_indices[1:] = torch.cumsum(valid.sum(dim=1, dtype=torch.int32), 0)
    nnz = int(crow_indices[-1])
    col_indices = torch.empty(nnz, dtype=torch.int32, device=boundary.device)
    values = boundary.new_empty(nnz)
    flat_offsets = torch.tensor([dy * width + dx for dy, dx in offsets], dtype=torch.int32,
                                device=boundary.device)
    for start in range(0, n, _CSR_CHUNK_ROWS):  # masks in chunks: boolean indexing makes int64 indices
        stop = min(start + _CSR_CHUNK_ROWS, n)
        lo, hi = int(crow_indices[start]), int(crow_indices[stop])
        mask = valid[start:stop]
        rows = torch.arange(start, stop, dtype=torch.int32, device=boundary.device)[:, None]
        col_indices[lo:hi] = (rows + flat_offsets)[mask]
        values[lo:hi] = weights[start:stop][mask]
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow_indices, col_indices, values, (n, n), check_invariants=False)


def random_walk(seeds, boundary, radius, beta, exp_times):
    """R = X @ T^(2^exp_times) with X = seeds * (1 - B), by 2^exp_times sparse products: (n, h, w).

    `seeds` (n, h, w), `boundary` (h, w), same device and float dtype.
    """
    n_maps, height, width = seeds.shape
    if boundary.shape != (height, width):
        raise ValueError(f"seeds {tuple(seeds.shape)} and boundary {tuple(boundary.shape)} differ in size")
    with _one_cpu_thread(seeds.device):
        transition_t = sparse_transition(boundary, radius, beta)
        walked = (seeds * (1 - boundary)).reshape(n_maps, -1).t().contiguous()  # (hw, n)
        for _ in range(2 ** exp_times):
            walked = transition_t @ walked
    return walked.t().reshape(n_maps, height, width)


@contextlib.contextmanager
def _one_cpu_thread(device):
    """Run the walk on one CPU thread (restored afterwards). Its ops are small (a product is ~1 MFLOP),
    so threads gain little, and on a busy machine each of the hundreds of parallel regions waits for a
    descheduled thread: 125 x 94 map, 0.2-0.3 s with one thread vs 3-4 s with two on 2 shared cores."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def dense_random_walk(seeds, boundary, radius, beta, exp_times):
    """The original's dense formulation (IRN's propagate_to_edge): reference only, O((hw)^2) memory.

    Pads the boundary with 1 (left, right, bottom) so pairs leaving the map get affinity 0, builds
    the dense affinity matrix from PathIndex pairs, crops it back, T = column-normalised A ** beta,
    squares T exp_times times and returns X @ T, (n, h, w).
    """
    height, width = seeds.shape[-2:]
    r = int(radius)
    padded_h, padded_w = height + r, width + 2 * r
    index = PathIndex(radius, (padded_h, padded_w))
    edge_padded = F.pad(boundary[None], (r, r, 0, r), mode="constant", value=1.0)
    pair_aff = edge_to_affinity(edge_padded[None], index.path_indices).reshape(-1)
    n_padded = padded_h * padded_w
    device = boundary.device
    src = torch.from_numpy(index.src_indices).to(device).repeat(index.dst_indices.shape[0])
    dst = torch.from_numpy(index.dst_indices).to(device).reshape(-1)
    diag = torch.arange(n_padded, device=device)
    indices = torch.cat([torch.stack([src, dst]), torch.stack([diag, diag]), torch.stack([dst, src])], dim=1)
    values = torch.cat([pair_aff, torch.ones(n_padded, dtype=pair_aff.dtype, device=device), pair_aff])
    dense = torch.sparse_coo_tensor(indices, values, (n_padded, n_padded),
                                    check_invariants=False).to_dense()
    dense = dense.view(padded_h, padded_w, padded_h, padded_w)[:-r, r:-r, :-r, r:-r]
    dense = dense.reshape(height * width, height * width)
    scaled = torch.pow(dense, beta)
    del dense
    trans = scaled / torch.sum(scaled, dim=0, keepdim=True)
    del scaled
    for _ in range(exp_times):
        trans = torch.matmul(trans, trans)
    x = seeds.reshape(-1, height, width) * (1 - boundary)
    return torch.matmul(x.reshape(-1, height * width), trans).reshape(-1, height, width)


# ------------------------------------------------------------------------------------- walk -> label

MAP_STRIDE = 4  # IRN's boundary and displacement maps are at 1/4 of the image


def walk_to_label(walked, keys, image_size, bg_thres, stride=MAP_STRIDE):
    """(H, W) uint8 class values from the walked seeds (n, h, w) of the classes `keys` (n,).

    Up-sample x`stride` (bilinear, align_corners=False), crop to `image_size`, divide by the global
    maximum, put a constant background map `bg_thres` in front, arg-max (ties to the first), map
    index 0 -> 0 and i -> keys[i-1] + 1.
    """
    height, width = image_size
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    if keys.size == 0:  # no class to spread: all background
        return np.zeros((height, width), np.uint8)
    up = F.interpolate(walked[:, None], scale_factor=stride, mode="bilinear",
                       align_corners=False)[:, 0, :height, :width]
    up = up / torch.max(up)
    up = F.pad(up, (0, 0, 0, 0, 1, 0), value=bg_thres)
    index = torch.argmax(up, dim=0).cpu().numpy()
    class_values = np.concatenate([[0], keys + 1]).astype(np.uint8)
    return class_values[index]
