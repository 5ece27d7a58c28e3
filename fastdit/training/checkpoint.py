"""Atomic, self-describing checkpoints on a local or shared filesystem.

Layout of ``<run>/checkpoints``::

    step_000001000/          one complete checkpoint
        state.pt             torch.save of plain containers and tensors (loads with weights_only=True):
                             format, step, model, ema, optimizer, scheduler, rng (list, one per rank),
                             data (list, one per rank), counters, world_size, config (JSON text)
        config.json          the run's TrainConfig as JSON
        model.safetensors    optional export of the model weights
        ema.safetensors      optional export of the EMA weights (buffers from the model)
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
"""
from __future__ import annotations

import os
import re
import shutil
import uuid
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

FORMAT_VERSION = 1
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step_(\d{9,})$")


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


def load_state(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read a checkpoint's ``state.pt`` (``path`` is the checkpoint folder or the file) with
    ``weights_only=True``; raises ``FileNotFoundError`` / ``ValueError`` with the path."""
    file = os.path.join(path, STATE_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no checkpoint state at {file}")
    state = torch.load(file, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{file} is not a fastdit checkpoint of format {FORMAT_VERSION}")
    return state


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
        """(step, path) of every complete checkpoint, oldest first."""
        if not os.path.isdir(self.directory):
            return []
        found = []
        for name in os.listdir(self.directory):
            m = _STEP_DIR.match(name)
            path = os.path.join(self.directory, name)
            if m and os.path.isfile(os.path.join(path, STATE_FILE)):
                found.append((int(m.group(1)), path))
        return sorted(found)

    def latest(self) -> Optional[str]:
        """The checkpoint ``latest`` names, if it is complete; else the highest complete step (the
        pointer can lag by one save when a crash hit between the folder rename and the pointer move)."""
        pointer = os.path.join(self.directory, LATEST_FILE)
        try:
            with open(pointer, "r", encoding="utf-8") as fh:
                name = fh.read().strip()
        except OSError:
            name = ""
        if _STEP_DIR.match(name) and os.path.isfile(os.path.join(self.directory, name, STATE_FILE)):
            return os.path.join(self.directory, name)
        found = self.complete()
        return found[-1][1] if found else None

    # ---- writing -------------------------------------------------------------------------------
    def save(self, step: int, state: Dict[str, Any], config_json: str,
             exports: Optional[Dict[str, Mapping[str, torch.Tensor]]] = None) -> str:
        """Write checkpoint ``step`` atomically, move ``latest`` to it, prune; returns its path.

        ``exports`` maps a name (``"model"``, ``"ema"``) to a state dict written as ``<name>.safetensors``.
        """
        os.makedirs(self.directory, exist_ok=True)
        final = os.path.join(self.directory, step_dirname(step))
        tmp = os.path.join(self.directory, f".tmp-{step_dirname(step)}-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        try:
            files = {STATE_FILE: lambda p: torch.save(state, p),
                     CONFIG_FILE: lambda p: _write_text(p, config_json)}
            for name, tensors in (exports or {}).items():
                files[f"{name}.safetensors"] = (
                    lambda p, t=tensors: save_safetensors(t, p, {"step": step, "format": "fastdit"}))
            for name, write in files.items():
                path = os.path.join(tmp, name)
                write(path)
                _fsync_file(path)
            _fsync_dir(tmp)
            if os.path.exists(final):
                # Re-saving a step (a run resumed from an older pointer): retire the old copy first.
                self._discard(final)
            _rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self.directory)
        self._point_latest(step_dirname(step))
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
        newest = self.latest()
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


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder from ``path``: a checkpoint folder itself, a ``checkpoints`` directory, or a
    run directory (its ``checkpoints/`` latest)."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
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
