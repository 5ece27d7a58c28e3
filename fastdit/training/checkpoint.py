"""Atomic, self-describing checkpoints on a local or shared filesystem.

Layout of ``<run>/checkpoints``::

    step_000001000/          one complete checkpoint
        state.pt             torch.save of plain containers and tensors (loads with weights_only=True):
                             format, step, model, ema, optimizer, scheduler, rng (list, one per rank),
                             data (list, one per rank), counters, world_size, config (JSON text)
        config.json          the run's TrainConfig as JSON
        model.safetensors    optional export of the model weights (checkpoint.safetensors, off by default)
        ema.safetensors      optional export of the EMA weights (buffers from the model)
        manifest.json        format, step, and the size and sha256 of every other file
    latest                   text file naming the newest complete checkpoint folder
    .tmp-...                 a checkpoint being written (or abandoned by a crash): never read

Every rank's RNG state and data position are gathered to rank 0 and stored in the one ``state.pt``
(they are a few KB per rank); rank ``r`` reads entry ``r`` on resume, so a resume needs the same world
size. Model and optimizer states are full (unsharded), with clean parameter names (no ``module.`` or
``_orig_mod.``), so checkpoints move freely between plain, compiled, DDP and FSDP runs.

Writing is atomic: files go into a fresh ``.tmp-*`` folder in the same directory, each file and the
folder are fsync'ed, the folder is renamed to ``step_*`` (atomic on POSIX), the directory is fsync'ed,
and only then is ``latest`` replaced (temp file + fsync + ``os.replace`` + directory fsync). A crash at
any point leaves the previous ``latest`` pointing at a complete checkpoint; a ``step_*`` folder only
exists once it is complete. Pruning keeps the newest ``keep_last`` complete checkpoints and never
deletes the one ``latest`` names.

Validation: ``manifest.json`` (written into the temp folder last, before the rename) lets
``validate_checkpoint`` catch a file that was truncated, emptied, altered or deleted after the save (a full
disk, a partial copy, bit rot) without unpickling anything. Checkpoints written before manifests existed
are validated by loading ``state.pt`` (``weights_only``) and checking the safetensors headers against the
file sizes. ``CheckpointManager.latest`` (``resume=auto``) returns the newest *valid* checkpoint, warning
about each damaged one it skips; ``resolve_checkpoint`` of an explicitly named checkpoint folder raises
``CheckpointError`` rather than falling back to another one. A save that fails for lack of space or any
other write error raises ``CheckpointWriteError`` and leaves no partial checkpoint behind.
"""
from __future__ import annotations

import errno as _errno
import hashlib
import json
import os
import pickle
import re
import shutil
import struct
import uuid
import warnings
import zipfile
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

FORMAT_VERSION = 1
MANIFEST_VERSION = 1
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
_MANIFEST_KEY = "manifest"  # in state.pt: written by a version that also writes manifest.json
_STEP_DIR = re.compile(r"^step_(\d{9,})$")


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or not a fastdit checkpoint (the message names the path and the
    problem)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (no space left, permissions, I/O error); nothing partial is left.

    ``str(err)`` is ``"no space left on device at PATH (needed about N bytes, M free)"`` or ``"cannot
    write checkpoint at PATH: reason"``; ``path``, ``needed`` and ``free`` (bytes, or None) hold the
    numbers, ``errno`` is ``ENOSPC`` for the former."""

    def __init__(self, message: str, *, path: Optional[str] = None, needed: Optional[int] = None,
                 free: Optional[int] = None):
        super().__init__(message)
        self.path, self.needed, self.free = path, needed, free


def step_dirname(step: int) -> str:
    return f"step_{step:09d}"


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    # Directory fsync makes a rename durable; some filesystems refuse it (then there is nothing to do).
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rename(src: str, dst: str) -> None:
    """The commit point of a checkpoint (a separate function so tests can inject a crash here)."""
    os.rename(src, dst)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str,
                     metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``tensors`` as safetensors (CPU, contiguous, unshared copies, so tied weights are fine)."""
    from safetensors.torch import save_file
    clean = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    save_file(clean, path, metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_state(path: str, map_location: Any = "cpu", mmap: bool = False) -> Dict[str, Any]:
    """Read a checkpoint's ``state.pt`` (``path`` is the checkpoint folder or the file) with
    ``weights_only=True`` (``mmap``: map the tensors from the file instead of reading them). Raises
    ``FileNotFoundError`` when there is no such file and ``CheckpointError`` (a ``ValueError``) naming the
    file when it does not load: truncated, empty or garbled, a pickle that ``weights_only`` refuses
    (arbitrary objects), or a file of some other format."""
    file = os.path.join(path, STATE_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no checkpoint state at {file}")
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol N" on foreign pickles: the error says more
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(file, map_location=map_location, weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, IndexError, TypeError,
            AttributeError, UnicodeDecodeError, struct.error) as err:
        raise CheckpointError(f"not a fastdit checkpoint or unsafe pickle: {file} ({_short_reason(err)})") from None
    except OSError as err:
        if isinstance(err, (FileNotFoundError, PermissionError)):
            raise
        raise CheckpointError(f"not a fastdit checkpoint or unsafe pickle: {file} ({_short_reason(err)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{file} is not a fastdit checkpoint of format {FORMAT_VERSION}")
    return state


def _short_reason(err: BaseException) -> str:
    """One readable line of a torch.load / safetensors error (no C++ backtrace, no advice paragraphs)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    if "WeightsUnpickler error:" in text:
        tail = text.split("WeightsUnpickler error:", 1)[1].strip()
        first = re.split(r"\n\s*\n|\. Please|\. Check", tail)[0]
        return "weights_only refused it: " + " ".join(first.split())[:200]
    if "PytorchStreamReader failed" in text:
        text = text[text.index("PytorchStreamReader failed"):]
    text = re.split(r"\. This is|\n", text.strip())[0] if text.strip() else ""
    text = " ".join(text.split())[:200]
    return text or type(err).__name__


# ---- validation ---------------------------------------------------------------------------------------
_VALID: Dict[str, Tuple] = {}  # realpath -> signature of its files when last found valid


def _signature(path: str) -> Tuple:
    entries = []
    for name in sorted(os.listdir(path)):
        st = os.stat(os.path.join(path, name))
        entries.append((name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return tuple(entries)


def _sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _file_entry(path: str) -> Dict[str, Any]:
    return {"size": os.path.getsize(path), "sha256": _sha256(path)}


def read_manifest(path: str) -> Optional[Dict[str, Any]]:
    """The parsed ``manifest.json`` of a checkpoint folder, ``None`` when it has none; raises
    ``CheckpointError`` when it is unreadable or malformed."""
    file = os.path.join(path, MANIFEST_FILE)
    if not os.path.exists(file):
        return None
    try:
        with open(file, "r", encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"invalid checkpoint {path}: unreadable {MANIFEST_FILE} ({_short_reason(err)})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict) or STATE_FILE not in files
            or not all(isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
                       for v in files.values())):
        raise CheckpointError(f"invalid checkpoint {path}: malformed {MANIFEST_FILE} (no size and sha256 of "
                              f"{STATE_FILE} and the other files)")
    return manifest


def validate_checkpoint(path: str) -> None:
    """Raise ``CheckpointError`` naming ``path`` and the problem unless ``path`` is an intact checkpoint
    folder.

    With a ``manifest.json``: every file it lists must exist with its size and sha256 (the step must match
    the folder name). Without one (checkpoints older than manifests): ``state.pt`` must load
    (``weights_only``) and every ``*.safetensors`` must have a readable header that accounts for its size;
    a ``state.pt`` written together with a manifest that has since gone missing is an error. A folder found
    valid is not re-read while none of its files changed (size, mtime, inode)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"invalid checkpoint {path}: " + ("not a directory" if os.path.exists(path)
                                                               else "no such directory"))
    key = os.path.realpath(path)
    try:
        signature = _signature(path)
    except OSError as err:
        raise CheckpointError(f"invalid checkpoint {path}: cannot list it ({_short_reason(err)})") from None
    if _VALID.get(key) == signature:
        return
    manifest = read_manifest(path)
    if manifest is not None:
        _check_manifest(path, manifest)
    else:
        _check_legacy(path)
    _VALID[key] = signature


def _check_manifest(path: str, manifest: Dict[str, Any]) -> None:
    m = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    if m and manifest.get("step") is not None and int(manifest["step"]) != int(m.group(1)):
        raise CheckpointError(f"invalid checkpoint {path}: {MANIFEST_FILE} is for step {manifest['step']}, "
                              f"the folder for step {int(m.group(1))}")
    for name, entry in manifest["files"].items():
        file = os.path.join(path, name)
        if os.path.basename(name) != name or not os.path.isfile(file):
            raise CheckpointError(f"invalid checkpoint {path}: missing file {name}")
        size = os.path.getsize(file)
        if size != entry["size"]:
            how = "truncated or partly copied?" if size < entry["size"] else "written to after the save?"
            raise CheckpointError(f"invalid checkpoint {path}: size mismatch of {name}: {size} bytes, the "
                                  f"manifest says {entry['size']} ({how})")
        if _sha256(file) != entry["sha256"]:
            raise CheckpointError(f"invalid checkpoint {path}: checksum mismatch of {name} (sha256 differs "
                                  "from the manifest's: the file was altered or corrupted)")


def _check_legacy(path: str) -> None:
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise CheckpointError(f"invalid checkpoint {path}: missing file {STATE_FILE} (and no {MANIFEST_FILE})")
    try:
        # every record must parse; with mmap the tensor data stays on disk (mmap needs torch's zip format:
        # anything else gets the plain load, whose error says what the file is)
        state = load_state(path, mmap=zipfile.is_zipfile(os.path.join(path, STATE_FILE)))
    except CheckpointError as err:
        raise CheckpointError(f"invalid checkpoint {path}: {err}") from None
    if state.get(_MANIFEST_KEY):
        raise CheckpointError(f"invalid checkpoint {path}: missing file {MANIFEST_FILE} (this checkpoint was "
                              "written with one; it cannot be verified)")
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            _check_safetensors_header(path, name)


def _check_safetensors_header(path: str, name: str) -> None:
    """The header must parse and its tensors' byte ranges must end exactly at the end of the file."""
    file = os.path.join(path, name)
    bad = f"invalid checkpoint {path}: {name} is not a complete safetensors file"
    size = os.path.getsize(file)
    try:
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{bad} ({size} bytes)")
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                raise CheckpointError(f"{bad} (header of {length} bytes in a file of {size})")
            header = json.loads(fh.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{bad} ({_short_reason(err)})") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        raise CheckpointError(f"{bad} (its header describes {expected} bytes, the file has {size})")


def load_weights(checkpoint: str, use_ema: bool = True) -> Tuple[Dict[str, torch.Tensor], str]:
    """(state dict, ``"ema"`` | ``"model"``) of a checkpoint: ``ema.safetensors`` / ``model.safetensors``
    when exported, else ``state.pt`` (its model weights, with the EMA's shadow over them for ``"ema"``).
    Without EMA weights the model's are returned.

    ``checkpoint`` is a checkpoint folder (validated first: ``CheckpointError`` when damaged) or a run /
    ``checkpoints`` directory (its newest valid checkpoint). A truncated or garbled safetensors file raises
    ``CheckpointError`` naming it."""
    folder = resolve_checkpoint(checkpoint)
    for name in (("ema", "model") if use_ema else ("model",)):
        path = os.path.join(folder, f"{name}.safetensors")
        if os.path.isfile(path):
            from safetensors import SafetensorError
            from safetensors.torch import load_file
            try:
                return load_file(path), name
            except (SafetensorError, OSError, ValueError) as err:
                raise CheckpointError(f"invalid checkpoint {folder}: cannot read {name}.safetensors "
                                      f"({_short_reason(err)})") from None
    state = load_state(folder)
    if use_ema and state.get("ema") is not None:
        return {**state["model"], **state["ema"]["shadow"]}, "ema"
    return state["model"], "model"


def state_nbytes(obj: Any) -> int:
    """Bytes of the tensors in a nested state (dicts, lists, tuples): about what ``torch.save`` writes."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v) for v in obj)
    return 0


def _free_bytes(path: str) -> Optional[int]:
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    try:
        return shutil.disk_usage(path or ".").free
    except OSError:
        return None


def _write_error(err: BaseException, path: str, needed: int) -> Optional[CheckpointWriteError]:
    """The ``CheckpointWriteError`` a failed save raises instead of ``err`` (None: re-raise ``err``)."""
    if isinstance(err, CheckpointWriteError) or not isinstance(err, Exception):
        return None
    text = str(err)
    storage = type(err).__name__ == "SafetensorError" and ("IoError" in text or "Io(" in text)
    torch_write = isinstance(err, RuntimeError) and ("file write failed" in text or "PytorchStreamWriter" in text
                                                     or "inline_container" in text)
    if not (isinstance(err, OSError) or torch_write or storage or "No space left" in text):
        return None
    free = _free_bytes(path)
    nospace = ((isinstance(err, OSError) and err.errno == _errno.ENOSPC) or "No space left" in text
               or "StorageFull" in text
               or ((torch_write or storage) and free is not None and free < needed))
    if nospace:
        message = (f"no space left on device at {path} (needed about {needed} bytes, "
                   f"{'an unknown number of bytes' if free is None else free} free)")
        out = CheckpointWriteError(message, path=path, needed=needed, free=free)
        out.errno = _errno.ENOSPC
        return out
    if isinstance(err, OSError):
        reason = err.strerror or _short_reason(err)
        if err.filename:
            reason += f" ({err.filename})"
        out = CheckpointWriteError(f"cannot write checkpoint at {path}: {reason}", path=path, needed=needed,
                                   free=free)
        out.errno = err.errno
        return out
    reason = "file write failed" if "file write failed" in text else _short_reason(err)
    return CheckpointWriteError(f"cannot write checkpoint at {path}: {reason}", path=path, needed=needed,
                                free=free)


class CheckpointManager:
    """Saves, lists, prunes and finds checkpoints in one directory (see the module docstring).

    Only one process (rank 0) should call ``save``/``prune``/``remove_temporaries``.
    """

    def __init__(self, directory: str, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory, self.keep_last = directory, keep_last

    # ---- reading -------------------------------------------------------------------------------
    def complete(self) -> List[Tuple[int, str]]:
        """(step, path) of every checkpoint folder, oldest first: ``step_*`` folders holding ``state.pt``
        or ``manifest.json`` (a folder only gets its ``step_*`` name once fully written; whether it is
        still intact is ``validate_checkpoint``'s question)."""
        if not os.path.isdir(self.directory):
            return []
        found = []
        for name in os.listdir(self.directory):
            m = _STEP_DIR.match(name)
            path = os.path.join(self.directory, name)
            if m and (os.path.isfile(os.path.join(path, STATE_FILE))
                      or os.path.isfile(os.path.join(path, MANIFEST_FILE))):
                found.append((int(m.group(1)), path))
        return sorted(found)

    def _pointed(self) -> Optional[str]:
        """The checkpoint ``latest`` names if it is one of ``complete()``."""
        try:
            with open(os.path.join(self.directory, LATEST_FILE), "r", encoding="utf-8") as fh:
                name = fh.read().strip()
        except OSError:
            return None
        path = os.path.join(self.directory, name)
        return path if _STEP_DIR.match(name) and any(p == path for _, p in self.complete()) else None

    def newest(self) -> Optional[str]:
        """Like ``latest`` without validating: the checkpoint ``latest`` names, else the highest step."""
        pointed = self._pointed()
        if pointed is not None:
            return pointed
        found = self.complete()
        return found[-1][1] if found else None

    def candidates(self) -> List[str]:
        """Checkpoint folders in the order ``latest`` tries them: the one the ``latest`` pointer names,
        then older ones newest first, then any newer than the pointer (a run resumed from an older
        checkpoint left them behind) newest first. Without a pointer: newest first."""
        found = self.complete()
        pointed = self._pointed()
        if pointed is None:
            return [p for _, p in reversed(found)]
        step = next(s for s, p in found if p == pointed)
        older = [p for s, p in reversed(found) if s < step]
        newer = [p for s, p in reversed(found) if s > step]
        return [pointed] + older + newer

    def latest(self) -> Optional[str]:
        """The newest *valid* checkpoint (``validate_checkpoint``) in ``candidates()`` order: the one
        ``latest`` names, falling back to older ones (the pointer can lag by one save when a crash hit
        between the folder rename and the pointer move; a damaged checkpoint is skipped). Each skipped
        checkpoint gets a ``warnings.warn`` naming it and the problem. ``None`` when there are no
        checkpoints; ``CheckpointError`` listing them when none is valid."""
        problems = []
        for path in self.candidates():
            try:
                validate_checkpoint(path)
            except CheckpointError as err:
                problems.append(str(err))
                continue
            for problem in problems:
                warnings.warn(f"skipping damaged checkpoint: {problem}; using {path}", RuntimeWarning,
                              stacklevel=2)
            return path
        if problems:
            raise CheckpointError(f"no valid checkpoint in {self.directory}: " + "; ".join(problems))
        return None

    # ---- writing -------------------------------------------------------------------------------
    def save(self, step: int, state: Dict[str, Any], config_json: str,
             exports: Optional[Dict[str, Mapping[str, torch.Tensor]]] = None) -> str:
        """Write checkpoint ``step`` atomically (with its ``manifest.json``), move ``latest`` to it, prune;
        returns its path.

        ``exports`` maps a name (``"model"``, ``"ema"``) to a state dict written as ``<name>.safetensors``.
        A write that fails (full disk, permissions, I/O error) raises ``CheckpointWriteError`` after removing
        the partial folder; the previous checkpoints and ``latest`` are untouched.
        """
        final = os.path.join(self.directory, step_dirname(step))
        tmp = os.path.join(self.directory, f".tmp-{step_dirname(step)}-{uuid.uuid4().hex[:8]}")
        needed = state_nbytes(state) + sum(state_nbytes(t) for t in (exports or {}).values()) + len(config_json)
        payload = {**state, _MANIFEST_KEY: MANIFEST_VERSION}
        try:
            os.makedirs(self.directory, exist_ok=True)
            os.makedirs(tmp)
            files = {STATE_FILE: lambda p: torch.save(payload, p),
                     CONFIG_FILE: lambda p: _write_text(p, config_json)}
            for name, tensors in (exports or {}).items():
                files[f"{name}.safetensors"] = (
                    lambda p, t=tensors: save_safetensors(t, p, {"step": step, "format": "fastdit"}))
            entries = {}
            for name, write in files.items():
                path = os.path.join(tmp, name)
                write(path)
                _fsync_file(path)
                entries[name] = _file_entry(path)
            manifest = {"format": FORMAT_VERSION, "manifest": MANIFEST_VERSION, "step": step, "files": entries}
            path = os.path.join(tmp, MANIFEST_FILE)
            _write_text(path, json.dumps(manifest, indent=1) + "\n")
            _fsync_file(path)
            _fsync_dir(tmp)
            if os.path.exists(final):
                # Re-saving a step (a run resumed from an older pointer): retire the old copy first.
                self._discard(final)
            _rename(tmp, final)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            failure = _write_error(err, self.directory, needed)
            if failure is not None:
                raise failure from None
            raise
        _fsync_dir(self.directory)
        try:
            self._point_latest(step_dirname(step))
        except Exception as err:
            failure = _write_error(err, self.directory, 0)
            if failure is not None:
                raise failure from None
            raise
        self.prune()
        return final

    def _point_latest(self, name: str) -> None:
        tmp = os.path.join(self.directory, f".tmp-latest-{uuid.uuid4().hex[:8]}")
        _write_text(tmp, name + "\n")
        _fsync_file(tmp)
        os.replace(tmp, os.path.join(self.directory, LATEST_FILE))
        _fsync_dir(self.directory)

    def _discard(self, path: str) -> None:
        # Rename first so a half-deleted folder never looks like a checkpoint.
        trash = os.path.join(self.directory, f".tmp-trash-{uuid.uuid4().hex[:8]}")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def prune(self) -> List[str]:
        """Delete complete checkpoints older than the newest ``keep_last``; never the ``latest`` one.
        Returns the deleted paths."""
        found = self.complete()
        newest = self.newest()  # no validation here: pruning runs after every save
        keep = {p for _, p in found[-self.keep_last:]} | ({newest} if newest else set())
        deleted = []
        for _, path in found:
            if path not in keep:
                self._discard(path)
                deleted.append(path)
        return deleted

    def remove_temporaries(self) -> None:
        """Delete ``.tmp-*`` leftovers of crashed saves (call before anyone starts saving)."""
        if os.path.isdir(self.directory):
            for name in os.listdir(self.directory):
                if name.startswith(".tmp-"):
                    path = os.path.join(self.directory, name)
                    if os.path.isdir(path):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        try:
                            os.remove(path)
                        except OSError:
                            pass


def is_checkpoint_folder(path: str) -> bool:
    """Whether ``path`` looks like one checkpoint folder (holds ``state.pt`` or ``manifest.json``)."""
    return os.path.isfile(os.path.join(path, STATE_FILE)) or os.path.isfile(os.path.join(path, MANIFEST_FILE))


def resolve_checkpoint(path: str) -> str:
    """A valid checkpoint folder from ``path``: a checkpoint folder itself (validated: ``CheckpointError``
    when damaged, never a silent fallback to another), a ``checkpoints`` directory, or a run directory
    (its ``checkpoints/``); for those two, the newest valid checkpoint (``CheckpointManager.latest``: a
    warning for each damaged one skipped, ``CheckpointError`` when none is valid). ``FileNotFoundError``
    when there is no checkpoint at all."""
    if is_checkpoint_folder(path):
        validate_checkpoint(path)
        return path
    for directory in (path, os.path.join(path, "checkpoints")):
        if os.path.isdir(directory):
            found = CheckpointManager(directory).latest()
            if found:
                return found
    raise FileNotFoundError(f"no complete fastdit checkpoint at or under {path}")


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
