"""Group a stream of per-image items into batches of images of one size (make_cam, make_advcam).

Images of equal size batch without padding. Padding would change values: after a convolution and a
frozen BatchNorm's shift the padded zeros are no longer zeros, and 3x3 convolutions, the max pool and
Grad-CAM's whole-map reductions carry them into the image's own pixels. So items wait in one bucket per
size; a bucket leaves as soon as it holds `group_size` items, and when `max_waiting` items wait in all
the buckets together, the fullest leaves early (bounded memory: most VOC images share a few sizes).
"""
from collections import OrderedDict


def same_size_groups(items, size_of, group_size, max_waiting=None):
    """Yield lists of at most `group_size` items with equal `size_of(item)`; every item exactly once.

    Order inside a group is arrival order; at most `max_waiting` (default 4 * group_size) items wait.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    max_waiting = max(group_size, max_waiting or 4 * group_size)
    buckets = OrderedDict()
    waiting = 0
    for item in items:
        bucket = buckets.setdefault(size_of(item), [])
        bucket.append(item)
        waiting += 1
        if len(bucket) == group_size:
            waiting -= len(bucket)
            yield buckets.pop(size_of(item))
        elif waiting >= max_waiting:
            fullest = max(buckets, key=lambda k: len(buckets[k]))
            waiting -= len(buckets[fullest])
            yield buckets.pop(fullest)
    for bucket in buckets.values():
        yield bucket
