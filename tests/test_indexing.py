"""misc/indexing.py against literal python loops over pixels and directions (docs/method.md §5.2, 5.3)."""
import math

import numpy as np
import pytest
import torch

from misc import indexing


def literal_directions(r):
    dirs = {(0, x) for x in range(1, r)}
    dirs |= {(y, x) for y in range(1, r) for x in range(-r + 1, r) if x * x + y * y < r * r}
    return dirs


def literal_path(d):
    dy, dx = d
    ys = range(min(0, dy), max(0, dy) + 1)
    xs = range(min(0, dx), max(0, dx) + 1)
    return {(y, x) for y in ys for x in xs if (dy * x - dx * y) ** 2 / (dy * dy + dx * dx) < 1}


@pytest.mark.parametrize("radius", [5, 10])
def test_directions_and_paths_follow_the_definitions(radius):
    dirs = indexing.search_directions(radius)
    assert len(dirs) == len(set(dirs))
    assert set(dirs) == literal_directions(radius)
    # forward half only: no direction is the opposite of another
    assert not {(-dy, -dx) for dy, dx in dirs} & set(dirs)
    for d in dirs:
        path = indexing.direction_path(d)
        assert set(path) == literal_path(d) and len(path) == len(set(path))
        assert path[0] == d and (0, 0) in path
    index = indexing.PathIndex(radius, (2 * radius + 3, 2 * radius + 5))
    # grouped by path length, increasing; every direction once
    lengths = [p.shape[1] for p in index.search_paths]
    assert lengths == sorted(set(lengths))
    assert sorted(map(tuple, index.search_dst.tolist())) == sorted(dirs)
    assert index.radius_floor == math.ceil(radius) - 1


def test_known_small_cases():
    assert indexing.search_directions(2) == [(0, 1), (1, -1), (1, 0), (1, 1)]
    assert set(indexing.direction_path((2, 1))) == {(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)}
    # (0, 2), (0, 3), (2, 0), (2, 1) are 16/13 or more squared away from the line to (2, 3)
    assert set(indexing.direction_path((2, 3))) == {(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (1, 3), (2, 2), (2, 3)}
    assert set(indexing.direction_path((0, 3))) == {(0, 0), (0, 1), (0, 2), (0, 3)}
    assert len(indexing.search_directions(5)) == 34


@pytest.mark.parametrize("radius,size", [(5, (13, 17)), (10, (22, 25))])
def test_path_index_matches_a_loop_over_pixels(radius, size):
    h, w = size
    index = indexing.PathIndex(radius, size)
    rf = radius - 1
    sources = [(y, x) for y in range(0, h - rf) for x in range(rf, w - rf)]
    assert index.src_indices.tolist() == [y * w + x for y, x in sources]
    dst = index.dst_indices
    assert dst.shape == (len(index.search_dst), len(sources))
    for k, (dy, dx) in enumerate(index.search_dst.tolist()):
        assert dst[k].tolist() == [(y + dy) * w + x + dx for y, x in sources]
    # every destination lies inside the map
    for y, x in sources:
        for dy, dx in index.search_dst.tolist():
            assert 0 <= y + dy < h and 0 <= x + dx < w
    # path_indices: group g, direction j, path point l, source s -> flat index of p + q
    k = 0
    for paths, ind in zip(index.search_paths, index.path_indices):
        for j in range(paths.shape[0]):
            for l, (qy, qx) in enumerate(paths[j].tolist()):
                assert ind[j, l].tolist() == [(y + qy) * w + x + qx for y, x in sources]
            k += 1
    assert k == len(index.search_dst)


@pytest.mark.parametrize("radius,size", [(5, (13, 17)), (10, (22, 25))])
def test_edge_to_affinity_matches_a_loop(radius, size):
    h, w = size
    g = torch.Generator().manual_seed(radius)
    edge = torch.rand(2, 1, h, w, generator=g, dtype=torch.float64)
    index = indexing.PathIndex(radius, size)
    aff = indexing.edge_to_affinity(edge, index.path_indices)
    rf = radius - 1
    sources = [(y, x) for y in range(0, h - rf) for x in range(rf, w - rf)]
    assert aff.shape == (2, len(index.search_dst), len(sources))
    expected = np.zeros(aff.shape)
    for b in range(2):
        for k, d in enumerate(index.search_dst.tolist()):
            path = literal_path(tuple(d))
            for s, (y, x) in enumerate(sources):
                expected[b, k, s] = 1 - max(edge[b, 0, y + qy, x + qx].item() for qy, qx in path)
    np.testing.assert_array_equal(aff.numpy(), expected)


@pytest.mark.parametrize("radius,size", [(5, (13, 17)), (10, (22, 25))])
def test_affinity_labels_match_a_loop(radius, size):
    h, w = size
    rng = np.random.default_rng(radius)
    label = rng.choice(np.array([0, 0, 3, 3, 7, 255], np.uint8), size=size)
    index = indexing.PathIndex(radius, size)
    bg_pos, fg_pos, neg = indexing.affinity_labels(label, index.src_indices, index.dst_indices)
    rf = radius - 1
    sources = [(y, x) for y in range(0, h - rf) for x in range(rf, w - rf)]
    for arr in (bg_pos, fg_pos, neg):
        assert arr.dtype == np.float32 and arr.shape == (len(index.search_dst), len(sources))
    for k, (dy, dx) in enumerate(index.search_dst.tolist()):
        for s, (y, x) in enumerate(sources):
            a, b = int(label[y, x]), int(label[y + dy, x + dx])
            valid = a < 21 and b < 21
            assert bg_pos[k, s] == float(valid and a == b == 0)
            assert fg_pos[k, s] == float(valid and a == b and a > 0)
            assert neg[k, s] == float(valid and a != b)
    assert bg_pos.sum() > 0 and fg_pos.sum() > 0 and neg.sum() > 0
    # the torch wrapper of the dataset returns the same values
    wrapped = indexing.GetAffinityLabelFromIndices(index.src_indices, index.dst_indices)(label)
    for t, arr in zip(wrapped, (bg_pos, fg_pos, neg)):
        assert isinstance(t, torch.Tensor) and np.array_equal(t.numpy(), arr)


@pytest.mark.parametrize("radius,size", [(5, (13, 17)), (10, (22, 25))])
def test_pair_displacement_matches_a_loop(radius, size):
    h, w = size
    disp = torch.randn(2, 2, h, w, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    index = indexing.PathIndex(radius, size)
    pair = indexing.pair_displacement(disp, index)
    rf = radius - 1
    sources = [(y, x) for y in range(0, h - rf) for x in range(rf, w - rf)]
    assert pair.shape == (2, 2, len(index.search_dst), len(sources))
    for b in range(2):
        for k, (dy, dx) in enumerate(index.search_dst.tolist()):
            for s, (y, x) in enumerate(sources):
                expected = disp[b, :, y, x] - disp[b, :, y + dy, x + dx]
                assert torch.equal(pair[b, :, k, s], expected)


def literal_walk_affinity(boundary, radius):
    """{(p, q): affinity} for every pair p, q = p + d inside the map, by loops."""
    h, w = boundary.shape
    paths = {d: literal_path(d) for d in literal_directions(radius)}
    pairs = {}
    for y in range(h):
        for x in range(w):
            for d, path in paths.items():
                ty, tx = y + d[0], x + d[1]
                if 0 <= ty < h and 0 <= tx < w:
                    pairs[(y * w + x, ty * w + tx)] = 1 - max(boundary[y + qy, x + qx] for qy, qx in path)
    return pairs


@pytest.mark.parametrize("radius,size", [(5, (9, 12)), (10, (12, 21)), (10, (6, 7))])
def test_walk_pairs_and_sparse_transition_match_loops(radius, size):
    h, w = size
    boundary = torch.rand(size, generator=torch.Generator().manual_seed(3), dtype=torch.float64) ** 2
    src, dst, aff = indexing.walk_pairs(boundary, radius)
    got = {(s, d): a for s, d, a in zip(src.tolist(), dst.tolist(), aff.tolist())}
    assert len(got) == len(src)  # no pair twice
    expected = literal_walk_affinity(boundary.numpy(), radius)
    assert got == expected

    beta = 10
    n = h * w
    a = np.eye(n)
    for (p, q), v in expected.items():
        a[p, q] = a[q, p] = v
    t = a ** beta
    t = t / t.sum(axis=0, keepdims=True)
    transition_t = indexing.sparse_transition(boundary, radius, beta)
    assert transition_t.layout == torch.sparse_csr
    np.testing.assert_allclose(transition_t.to_dense().numpy().T, t, rtol=1e-12, atol=0)
    np.testing.assert_allclose(t.sum(axis=0), 1.0)


def test_walk_pairs_on_a_map_narrower_than_the_radius():
    boundary = torch.rand(3, 2, dtype=torch.float64)
    src, dst, aff = indexing.walk_pairs(boundary, 5)
    assert {(s, d) for s, d in zip(src.tolist(), dst.tolist())} == set(literal_walk_affinity(boundary.numpy(), 5))
    with pytest.raises(ValueError, match="no source pixel"):
        indexing.PathIndex(10, (16, 16))
