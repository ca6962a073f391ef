"""Provenance: every output folder and weights file records what made it, so nothing stale is reused.

Beside its outputs a step keeps a small JSON manifest: the step and the inputs that decide the result
(flag values, weights files and lists by content hash, the manifest of an input folder), plus, for
information only, the project version and when it was written. A folder's manifest is
`<folder>/provenance.json`, a weights file's `<file>.provenance.json`.

On a re-run a step asks here first:
- matching manifest: the outputs are reused (a folder step resumes, a training step is skipped);
- a manifest of other inputs, or outputs without a manifest: an InputError naming what differs and
  offering --overwrite (recompute: the folder's outputs are deleted first) or another folder / file.

Hidden temp files (`.<name>.<random>.tmp`, misc.utils.atomic_path) left by a killed run are removed here
too, before the step writes anything.
"""
import contextlib
import datetime
import functools
import glob
import hashlib
import json
import os
import subprocess

from misc.utils import InputError, save_json

FOLDER_MANIFEST = "provenance.json"
FILE_MANIFEST_SUFFIX = ".provenance.json"
DIGEST_CHARS = 16       # of the sha256 hex digest: plenty to tell files apart, short in messages
_MAX_SHOWN = 3          # differences shown in one error line
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------- identities

@functools.lru_cache(maxsize=64)
def _digest_of(path, size, mtime_ns):
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return "sha256:" + sha.hexdigest()[:DIGEST_CHARS]


def file_digest(path):
    """Content hash of a file (cached on path, size and mtime); `path` itself if it is not a file
    (a URL, 'none')."""
    if path is None or not os.path.isfile(path):
        return path
    stat = os.stat(path)
    return _digest_of(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


def list_digest(items):
    """Content hash of a list of ids or paths (order kept)."""
    return "sha256:" + hashlib.sha256("\n".join(items).encode()).hexdigest()[:DIGEST_CHARS]


def folder_identity(folder):
    """What identifies an input folder: the hash of its manifest ('unrecorded' if it has none)."""
    manifest = os.path.join(folder, FOLDER_MANIFEST)
    return file_digest(manifest) if os.path.isfile(manifest) else "unrecorded"


@functools.lru_cache(maxsize=1)
def project_version():
    """The git commit of the code (with '+changes' if the tree is modified), else 'unknown'."""
    try:
        run = functools.partial(subprocess.run, cwd=_PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        commit = run(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("+changes" if dirty else "")) if commit else "unknown"


def flag_values(args, names):
    """{name: value} of the given flags, the way they are recorded (JSON types); a flag a hand-made
    namespace (a test's) lacks is None."""
    return _as_json({name: getattr(args, name, None) for name in names})


def non_default_flags(args, defaults):
    """{name: value} of the flags of `defaults` ({name: default}) whose value is not the default: flags added
    after records were written are recorded only when used, so those records stay valid."""
    return _as_json({n: getattr(args, n, d) for n, d in defaults.items() if getattr(args, n, d) != d})


# -------------------------------------------------------------------------------------- manifests

def _as_json(obj):
    return json.loads(json.dumps(obj))


def read_manifest(path):
    """The manifest at `path` (None if there is none); a corrupt one is an InputError."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict) or "step" not in manifest or "inputs" not in manifest:
            raise ValueError("no step / inputs entries")
        return manifest
    except (ValueError, OSError) as e:
        raise InputError(f"cannot read the provenance record {path} ({e}); pass --overwrite to recompute "
                         f"what it describes") from None


def differences(manifest, step, inputs):
    """'name: old -> new' for each decisive entry that differs between `manifest` and (step, inputs)."""
    diffs = [] if manifest["step"] == step else [f"step: {manifest['step']} -> {step}"]
    old, new = manifest["inputs"], _as_json(inputs)
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            diffs.append(f"{name}: {old.get(name, 'absent')} -> {new.get(name, 'absent')}")
    return diffs


def _write(path, step, inputs, extra):
    save_json(path, {"step": step, "inputs": _as_json(inputs), "project_version": project_version(),
                     "written": datetime.datetime.now().isoformat(timespec="seconds"), **_as_json(extra or {})})


def _stale_message(what, diffs, new_place):
    shown = "; ".join(diffs[:_MAX_SHOWN]) + (f"; ... ({len(diffs) - _MAX_SHOWN} more)" if len(diffs) > _MAX_SHOWN
                                             else "")
    return f"{what} made by other inputs ({shown}): pass --overwrite to recompute, or {new_place}"


def _remove_stale_temps(folder, prefix="."):
    for tmp in glob.glob(os.path.join(glob.escape(folder), glob.escape(prefix) + "*.tmp")):
        if os.path.basename(tmp).startswith("."):
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)


# ---------------------------------------------------------------------------------- what steps call

def _overwrite(args):
    """The driver's --overwrite; False (stop, never delete) for an args namespace without it."""
    return bool(getattr(args, "overwrite", False))


def claim_folder(folder, step, inputs, suffix, args, flag, extra=None):
    """Make `folder` (the output folder of `step`, set by `flag`) safe to resume: after this call every
    `*<suffix>` file in it was made by `inputs`. Stale outputs raise InputError, or with --overwrite
    (in `args`) are deleted. Records the manifest before the step writes anything; `extra` is recorded,
    not compared."""
    overwrite = _overwrite(args)
    os.makedirs(folder, exist_ok=True)
    _remove_stale_temps(folder)
    manifest_file = os.path.join(folder, FOLDER_MANIFEST)
    manifest = None if overwrite else read_manifest(manifest_file)
    outputs = sorted(glob.glob(os.path.join(glob.escape(folder), "*" + suffix)))
    if manifest is not None:
        diffs = differences(manifest, step, inputs)
        if not diffs:
            return
        if not overwrite:
            raise InputError(_stale_message(f"{folder} holds {len(outputs)} {manifest['step']} output(s)", diffs,
                                            f"give another {flag}"))
    elif outputs and not overwrite:
        raise InputError(f"{folder} holds {len(outputs)} {suffix} file(s) with no provenance record "
                         f"({FOLDER_MANIFEST}), so what made them is unknown: pass --overwrite to recompute "
                         f"them, or give another {flag}")
    if overwrite and outputs:
        print(f"{step}: --overwrite: removing {len(outputs)} {suffix} file(s) from {folder}")
        for path in outputs:
            os.remove(path)
    _write(manifest_file, step, inputs, extra)


def file_up_to_date(path, step, inputs, args, flag):
    """Whether the output file `path` (weights, a list) exists and is to be kept: the step is then
    skipped, and the returned text says why. Kept: a file made by (step, inputs), or a file without a
    record, which no step of this project wrote (the release's ID classifier or OoD list, put there by
    hand as the W-OoD README says): it is used as given, and the text says so (`inputs` may be a
    function that computes them, called only when a record is to be compared). A file recorded with other
    inputs raises InputError unless --overwrite (in `args`; then False: make it again; it is replaced
    when the new one is written)."""
    overwrite = _overwrite(args)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(folder):
        _remove_stale_temps(folder, "." + os.path.basename(path) + ".")
    if not os.path.isfile(path) or overwrite:
        return False
    manifest = read_manifest(path + FILE_MANIFEST_SUFFIX)
    if manifest is None:
        return (f"no provenance record ({os.path.basename(path)}{FILE_MANIFEST_SUFFIX}): not made by this "
                f"project's {step}, used as given; --overwrite makes it again")
    diffs = differences(manifest, step, inputs() if callable(inputs) else inputs)
    if diffs:
        raise InputError(_stale_message(f"{path} was", diffs, f"give another {flag}"))
    return "made by these inputs"


def forget_file(path):
    """Remove the record of `path` before rewriting it, so a kill between the file's write and its
    record's leaves a file with no record (refused on the next run), never with a wrong one."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path + FILE_MANIFEST_SUFFIX)


def record_file(path, step, inputs, extra=None):
    """Record what made the output file `path` (after it is written)."""
    _write(path + FILE_MANIFEST_SUFFIX, step, inputs, extra)


def save_weights(path, state_dict, step, inputs, extra=None):
    """save_torch `state_dict` to `path` with its record."""
    from misc.utils import save_torch
    forget_file(path)
    save_torch(path, state_dict)
    record_file(path, step, inputs, extra)


def input_file(path, what):
    """The content hash of a required input file (InputError naming it and `what` if missing)."""
    from misc.utils import require_file
    return file_digest(require_file(path, what))
