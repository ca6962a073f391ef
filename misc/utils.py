"""Small shared utilities: clear input errors, atomic file writes, safe (pickle-free) I/O.

Every output of the pipeline goes through `atomic_path`: it is written to a temporary file in the
same folder and renamed into place, so an interrupted run never leaves a truncated file behind and
a resumed run can trust that every file it finds is complete.
"""
import contextlib
import json
import os
import tempfile
import zipfile

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)


class InputError(RuntimeError):
    """Bad user input (missing folder, unreadable file, wrong checkpoint...).

    The message names the offending path and what is expected there. The driver prints it without
    a stack trace and exits with status 2.
    """


def error_line(error):
    """The one line to print for an InputError; one raised in a DataLoader worker arrives wrapped in the
    worker's traceback ("Caught InputError in DataLoader worker process 0. Original Traceback ..."), whose
    last line is the original message."""
    text = str(error)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split("InputError: ", 1)[-1]
    return text


def str2bool(value):
    """argparse type for booleans: true/false/1/0/yes/no (any case); anything else is an error."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    import argparse
    raise argparse.ArgumentTypeError(f"expected true/false/1/0/yes/no, got {value!r}")


def require_dir(path, what):
    """Raise InputError unless `path` is an existing folder; `what` says what belongs there."""
    if not os.path.isdir(path):
        raise InputError(f"missing folder {path}: expected {what} there")
    return path


def require_file(path, what):
    """Raise InputError unless `path` is an existing file; `what` says what it should be."""
    if not os.path.isfile(path):
        raise InputError(f"missing file {path}: expected {what}")
    return path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # hidden, and not ending in the real extension, so a leftover (after SIGKILL) is never taken
    # for an output; every writer here passes a file object or an explicit format
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


_NPZ_DATE = (1980, 1, 1, 0, 0, 0)  # a fixed zip-entry time: the same arrays give the same bytes


def write_npz(file, arrays):
    """np.savez's format (uncompressed zip of .npy entries) into the open binary `file`, with a fixed
    entry time: the bytes depend on the arrays only (np.savez stamps each entry with the time of writing)."""
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, value in arrays.items():
            with archive.open(zipfile.ZipInfo(key + ".npy", date_time=_NPZ_DATE), "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(value), allow_pickle=False)


def save_npz(path, **arrays):
    """Write arrays to `path` (.npz, uncompressed) atomically; no pickled objects allowed. Outputs made by
    one process or by several (misc/dist.py) can be compared byte for byte."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write_npz(f, arrays)


def load_npz(path):
    """Read a .npz written by `save_npz` into a dict of arrays (never unpickles)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise InputError(f"missing file {path}") from None
    except Exception as e:  # truncated zip, wrong format, pickled object arrays...
        raise InputError(f"cannot read {path} ({type(e).__name__}: {e}); delete it and re-run the step "
                         f"that makes it") from None


def save_png(path, array, palette=None):
    """Write a uint8 (H, W) label map (optionally with a colour palette) or an (H, W, 3) image."""
    from PIL import Image
    img = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))
    if palette is not None:
        img.putpalette(list(np.asarray(palette, dtype=np.uint8).reshape(-1)))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def save_json(path, obj):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")


def save_torch(path, state_dict):
    import torch
    with atomic_path(path) as tmp:
        torch.save(state_dict, tmp)


def load_torch(path, map_location="cpu", what="a PyTorch state dict (.pth); train it with the step that "
                                                "writes it or download the released weights"):
    """Load a state dict safely (weights_only=True), with a clear error if it is missing/corrupt;
    `what` says in the missing-file error what belongs there."""
    import torch
    require_file(path, what)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise InputError(f"cannot load weights {path} ({type(e).__name__}: {e}); the file is corrupt, "
                         f"truncated or not a state dict") from None


def pending(ids, out_path_of):
    """The ids whose output file does not exist yet (what a resumed step still has to do)."""
    return [i for i in ids if not os.path.exists(out_path_of(i))]


def palette_voc():
    """The PASCAL VOC colour palette (256 x 3 uint8), as in the devkit's bitget construction."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal
