"""The run folder's rules (SPEC §10): what ``--overwrite`` may delete, what ``--resume`` accepts,
temporary files, and checkpoints read with errors that name the file.

A folder is a bear run when it holds the marker file ``.bear-run``, written when the run is
created. ``--overwrite`` replaces only such a folder, and only the files bear writes there
(``RUN_FILES``); anything else in it stays. Every check runs before anything is touched.
``--resume`` refuses a changed setting unless its ``TrainConfig`` field carries
``metadata["resume_may_change"]`` (settings that cannot change the trained weights).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import MISSING, Field, asdict, fields
from pathlib import Path

import torch

from bear.config import TrainConfig, flag_name
from bear.data import TITLES_FILE

__all__ = [
    "MARKER",
    "LOCK",
    "RunLock",
    "RUN_FILES",
    "RUN_FILE_PATTERNS",
    "TEMP_SUFFIX",
    "check_run_folder",
    "prepare_run",
    "resume_conflicts",
    "data_fingerprint",
    "read_saved_config",
    "temp_file_beside",
    "remove_temp_files",
    "read_checkpoint",
    "LAST_KEYS",
]

MARKER = ".bear-run"
LOCK = ".bear-lock"  # RunLock's file: the pid of the launch that owns the folder
# Every file or folder bear writes in a run folder: all --overwrite deletes (add new ones here).
RUN_FILES = (
    "config.json",
    "log.jsonl",
    "tokenizer",
    "last.pt",
    "best.pt",
    "partial.pt",
    "best_check.pt",
    "metrics.json",
    "curves.png",
    "anatomy.png",
    "model",
    ".model.tmp",
)
# the upstream protocol's per-epoch weights (bear.protocol); TensorBoard events (bear.tensorboard)
RUN_FILE_PATTERNS = ("epoch_*.pt", "events.out.tfevents.*.bear")
TEMP_SUFFIX = ".bear-tmp"  # temporary files of atomic writes: .NAME.<random>.bear-tmp
LAST_KEYS = ("model", "optimizer", "scheduler", "rng", "state")  # what RUN/last.pt holds
_MARKER_TEXT = (
    "This folder holds a bear training run. `python -m bear train --overwrite` may replace the\n"
    "files bear wrote here, and only those.\n"
)


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _check_writable(run: Path) -> None:
    if run.is_symlink() and not run.exists():
        raise FileNotFoundError(
            f"--out {run}: a symbolic link to {os.readlink(run)}, which does not exist; create "
            "its target or give another --out"
        )
    if run.exists() and not run.is_dir():
        raise FileExistsError(f"--out {run}: is a file, not a folder; give a folder path")
    existing = _nearest_existing(run)
    if not existing.is_dir():
        raise NotADirectoryError(f"--out {run}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            f"--out {run}: {existing} is not writable; choose a folder you can write to"
        )


def _default_value(f: Field):
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def _as_json(value):
    return json.loads(json.dumps(value, default=str))


def resume_conflicts(saved: dict, cfg: TrainConfig) -> list[str]:
    """The settings of ``cfg`` that differ from a run's saved config.json, as "--flag is NEW but the
    run used OLD" (empty: the run may resume). Fields with ``metadata["resume_may_change"]`` may
    differ; a field the saved config lacks (an older bear) counts as its default."""
    return config_conflicts(saved, cfg, lambda f: f.metadata.get("resume_may_change", False))


def config_conflicts(saved: dict, cfg: TrainConfig, may_differ) -> list[str]:
    """As ``resume_conflicts``, with ``may_differ(field) -> bool`` naming the fields let through."""
    now = _as_json(asdict(cfg))
    conflicts = []
    for f in fields(cfg):
        if may_differ(f):
            continue
        before = saved[f.name] if f.name in saved else _as_json(_default_value(f))
        if now[f.name] != before:
            name = flag_name(f) if f.metadata.get("cli", True) else f.name
            conflicts.append(f"{name} is {now[f.name]!r} but the run used {before!r}")
    return conflicts


def data_fingerprint(cfg: TrainConfig) -> dict[str, dict]:
    """The data files that decide what a run trains (the catalogue, its training file, and
    valid.csv where there is one, which selects), each by its size and SHA-256, keyed by name:
    recorded in config.json. The test file is left out: evaluation may change it."""
    folder = Path(cfg.data)
    names = (TITLES_FILE, cfg.train_file, "valid.csv")
    out = {}
    for name in names:
        path = folder / name
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[name] = {"bytes": path.stat().st_size, "sha256": digest}
    return out


def _check_data(cfg: TrainConfig, saved: dict, run: Path) -> None:
    """ValueError naming the first data file that changed since the run began (unless
    --allow-data-change): a resumed run would train on other rows than its first steps did."""
    before = saved.get("data_fingerprint")
    if before is None or cfg.allow_data_change:
        return
    now = data_fingerprint(cfg)
    decides = {TITLES_FILE, cfg.train_file, "valid.csv"}  # an older run also recorded its test file
    for name in sorted(set(now) | (set(before) & decides)):
        if before.get(name) != now.get(name):
            was = before.get(name, {}).get("bytes", "no file")
            is_ = now.get(name, {}).get("bytes", "no file")
            raise ValueError(
                f"--resume: {Path(cfg.data) / name} changed since {run} began ({was} bytes then, "
                f"{is_} now, or other content); resume on the data the run trained on, or pass "
                "--allow-data-change if the change is intended"
            )


def _check_resume(cfg: TrainConfig, run: Path) -> None:
    if not (run / MARKER).is_file():
        raise FileNotFoundError(
            f"--resume: {run} holds no bear run (no {MARKER} file); nothing to resume"
        )
    fix = "the run stopped before it began; start it anew with --overwrite"
    saved = read_saved_config(run, fix)
    conflicts = resume_conflicts(saved, cfg)
    if conflicts:
        raise ValueError(
            f"--resume: {'; '.join(conflicts)}; these change the trained weights, so resume with "
            f"the run's settings ({run / 'config.json'}) or start a new run"
        )
    _check_data(cfg, saved, run)


def read_saved_config(run: Path, fix: str) -> dict:
    """The JSON object in RUN/config.json. Raises FileNotFoundError (ending with ``fix``) if it is
    missing, ValueError if it is not a JSON object."""
    config_path = run / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing; {fix}")
    try:
        saved = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{config_path}: expected a JSON object of TrainConfig fields")
    return saved


def check_run_folder(cfg: TrainConfig, run: Path) -> None:
    """Raise if ``run`` cannot take this run; touches nothing.

    ``--out`` must be a writable folder path. ``--resume`` needs a bear run whose config.json
    matches ``cfg`` (``resume_conflicts``). Otherwise a non-empty folder needs ``--overwrite``
    and the marker file. Raises FileExistsError, FileNotFoundError, NotADirectoryError,
    PermissionError or ValueError, each naming the folder or setting and the fix.
    """
    _check_writable(run)
    if cfg.resume:
        _check_resume(cfg, run)
        return
    if run.exists() and any(p.name != LOCK for p in run.iterdir()):  # a lock alone: empty
        if not cfg.overwrite:
            raise FileExistsError(f"{run}: exists and is not empty; pass --overwrite to reuse it")
        if not (run / MARKER).is_file():
            raise FileExistsError(
                f"{run}: holds no bear run (no {MARKER} file), so --overwrite deletes nothing "
                "there; choose another --out"
            )


def _remove_run_files(run: Path) -> None:
    remove_temp_files(run)
    patterned = [p for pattern in RUN_FILE_PATTERNS for p in run.glob(pattern)]
    for path in [run / name for name in RUN_FILES] + patterned:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


class RunLock:
    """One launch owns a run folder at a time: an advisory lock (``flock``) on RUN/.bear-lock,
    which holds the owner's pid. The kernel releases it when the owning process ends, however it
    ends, so the file a killed run leaves behind never blocks ``--resume``."""

    def __init__(self, run: Path):
        self.path, self.fd = run / LOCK, None

    def acquire(self) -> RunLock:
        """Take the lock (creating the folder); FileExistsError naming the holder's pid when
        another process has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FileExistsError(
                f"{self.path.parent}: another bear train (pid {holder}) is writing this run "
                "folder; wait for it to end or stop it, then run again"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and let go of the lock."""
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)  # closing releases the flock
            self.fd = None


def prepare_run(cfg: TrainConfig, run: Path, rank: int) -> RunLock | None:
    """On rank 0: take the run folder's lock (``RunLock``: this launch owns it), check it again
    (``check_run_folder``), then create it with its marker file; other ranks do nothing (they
    checked it before, and rank 0 owns it for the launch). Returns the lock (rank 0).

    ``--overwrite`` of a bear run first deletes the files bear wrote there (``RUN_FILES``,
    ``RUN_FILE_PATTERNS`` and temporary files), nothing else; ``--resume`` deletes the temporary
    files of a killed write.
    """
    if rank != 0:
        return None
    lock = RunLock(run).acquire()
    check_run_folder(cfg, run)
    if (run / MARKER).is_file():
        if cfg.resume:
            remove_temp_files(run)
        else:
            _remove_run_files(run)
    run.mkdir(parents=True, exist_ok=True)
    (run / MARKER).write_text(_MARKER_TEXT)
    return lock


def temp_file_beside(path: Path) -> Path:
    """A new empty temporary file in ``path``'s folder, named ``.NAME.<random>.bear-tmp``, for a
    write that is then renamed onto ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would keep the run from a shared group
    return Path(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_temp_files(run: Path) -> None:
    """Delete the temporary files bear's atomic writes left in ``run`` (a killed write)."""
    for path in run.glob(f".*{TEMP_SUFFIX}"):
        path.unlink(missing_ok=True)


def read_checkpoint(path: Path, keys: tuple[str, ...] = ("model",), fix: str = "") -> dict:
    """The dict bear saved in a checkpoint file, loaded on the CPU.

    Raises FileNotFoundError if ``path`` is missing and ValueError if it cannot be read (a
    truncated, empty or foreign file) or lacks ``keys``; both name the file and end with ``fix``
    (default: train the run anew).
    """
    fix = fix or "train the run anew with --overwrite"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; {fix}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch.load raises many types on a damaged file
        cause = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}: {cause}); "
            f"the file is damaged; {fix}"
        ) from exc
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path}: not a bear checkpoint (no {', '.join(missing)}); {fix}")
    return ckpt
