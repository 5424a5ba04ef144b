"""Run records: the JSON files a run keeps about itself, read and written one way.

A record is a JSON object in a file: the run's manifest (:class:`Manifest`, ``<run_dir>/manifest.json``), a stage's
record of an output (``synth/manifest.json``, ``teacher/manifest.json``, ``queries/<task>/manifest.json``; the
``stm_ray`` section of ``eval/<label>/<task>.json``; ``merged/merge.json``, ``search/instructions.json``), a model
folder's ``stm_ray.json``, a corpus index's meta.

**The one rule for reading** (:func:`read_record`): a missing file is no record (None). A file that cannot be read,
is not valid JSON (corrupt: e.g. half written by an older version without atomic writes, or edited by hand) or is not
a record (foreign: not a JSON object, or without the keys the caller requires) is logged once as a WARNING naming
the file and what is wrong, and is then no record either. Reading never raises for these. To the stage contract
(:func:`stm_ray.stage.decide`) no record means ``run``: the output it described is built again, never reused on
the word of a file nobody can read.

Writing (:func:`write_record`) is atomic (a temporary file beside the record, then a rename: a reader sees the old
record or the new one) and, inside a remote run's working copy, puts the record on the object store at once.

:class:`StageRecord` is the sequence every stage with a record file follows: read and decide, mark running, work,
mark done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stm_ray.utils import atomic_write_json

if TYPE_CHECKING:
    from stm_ray.config import PipelineConfig
    from stm_ray.stage import Decision, Fingerprint

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"  # the run's manifest, in the run directory

_warned: set[tuple[str, str, int, int]] = set()


def _warn_once(path: Path, kind: str, problem: str) -> None:
    try:
        st = path.stat()
        sig = (st.st_mtime_ns, st.st_size)
    except OSError:
        sig = (0, 0)
    key = (str(path), problem, *sig)
    if key in _warned:  # the same file, unchanged, read again (by another stage, or the report)
        return
    _warned.add(key)
    log.warning("%s: %s %s; treated as missing", path, kind, problem)


def read_record(path: str | os.PathLike, *, kind: str = "record", require: Iterable[str] = ()) -> dict[str, Any] | None:
    """The record (a JSON object) in ``path``, or None when there is none: missing, or unreadable, corrupt or
    foreign (see the module docstring; ``kind`` names the record in the warning, ``require`` lists keys a record of
    this kind has). Never raises for a bad file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except UnicodeDecodeError as e:
        _warn_once(path, kind, f"is not UTF-8 text ({e})")
        return None
    except OSError as e:
        _warn_once(path, kind, f"cannot be read ({type(e).__name__}: {e})")
        return None
    try:
        obj = json.loads(text)
    except ValueError as e:
        _warn_once(path, kind, f"is not valid JSON ({e})")
        return None
    if not isinstance(obj, dict):
        _warn_once(path, kind, f"is not a JSON object (a {type(obj).__name__})")
        return None
    missing = [k for k in require if k not in obj]
    if missing:
        _warn_once(path, kind, f"lacks {', '.join(map(repr, missing))}")
        return None
    return obj


def write_record(path: str | os.PathLike, obj: dict[str, Any]) -> Path:
    """Write the record ``obj`` to ``path`` atomically (indented JSON); inside a remote run's working copy it is put
    on the object store at once."""
    return atomic_write_json(path, obj)


class StageRecord:
    """A stage's record file of one output (``path``), written under the fingerprint ``fp``::

        rec = StageRecord(out / "manifest.json", fp, kind="teacher manifest")
        action = rec.decide("scores", finished=lambda r: ...).action  # rec.record: what was there (or None)
        if action == "reuse": return rec.record["counts"]
        rec.begin(config=...)  # {fingerprint, fingerprint_material, status: running, config}
        ...                    # the work; interrupted, the record stays "running": a rerun resumes
        rec.done(counts=...)   # {fingerprint, fingerprint_material, status: done, counts}
    """

    def __init__(self, path: str | os.PathLike, fp: Fingerprint, *, kind: str = "stage record") -> None:
        self.path = Path(path)
        self.fp = fp
        self.kind = kind
        self.record: dict[str, Any] | None = None

    def read(self) -> dict[str, Any] | None:
        self.record = read_record(self.path, kind=self.kind)
        return self.record

    def decide(self, item: str, *, finished: Callable[[dict[str, Any]], bool] | None = None,
               where: str | None = None) -> Decision:
        """The stage contract's decision for the output: complete when the record says ``done`` and ``finished``
        (when given) agrees, e.g. that every file it lists is there."""
        from stm_ray.stage import decide

        rec = self.read()
        complete = rec is not None and rec.get("status") == "done" and (finished is None or bool(finished(rec)))
        return decide(self.fp, item, rec, complete=complete, where=str(self.path.parent) if where is None else where)

    def _write(self, status: str, fields: dict[str, Any]) -> None:
        write_record(self.path, {**self.fp.record(), "status": status, **fields})

    def begin(self, **extra: Any) -> None:
        """Mark the output unfinished (before any of it is written): a rerun under the same fingerprint resumes."""
        self._write("running", extra)

    def done(self, **result: Any) -> None:
        """Mark the output finished (after all of it is written), with what the stage reports about it."""
        self._write("done", result)


# --------------------------------------------------------------------------------------------- the run's manifest
_PACKAGES = ("stm-ray", "ray", "torch", "transformers", "sentence-transformers", "peft", "deepspeed", "vllm",
             "mergekit", "mteb")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def config_fingerprint(cfg: PipelineConfig) -> str:
    """The whole config's values that change outputs (for the record; each stage decides by its own fingerprint)."""
    from stm_ray.config import output_values

    return hashlib.sha256(json.dumps(output_values(cfg), sort_keys=True).encode()).hexdigest()[:16]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Manifest:
    """``<run_dir>/manifest.json``, rewritten atomically on every change. An earlier manifest's stages and creation
    time carry over; one that is corrupt or foreign is ignored (:func:`read_record`): a new one starts."""

    def __init__(self, cfg: PipelineConfig):
        from stm_ray.stages import NAMES
        from stm_ray.storage import run_path

        self.path = run_path(cfg.run_dir) / MANIFEST
        self.fingerprint = config_fingerprint(cfg)
        old = read_record(self.path, kind="run manifest", require=("stages",)) or {}
        stages = old.get("stages")
        self.data: dict[str, Any] = {"run_dir": str(cfg.run_dir), "fingerprint": self.fingerprint,
                                     "config": cfg.model_dump(mode="json"), "versions": versions(),
                                     "created": old.get("created", now()), "updated": now(),
                                     "stages": {k: v for k, v in stages.items() if isinstance(v, dict)}
                                     if isinstance(stages, dict) else {}}
        for name in NAMES:
            self.data["stages"].setdefault(name, {"status": "pending"})

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"][name]

    def update(self, name: str, **fields: Any) -> None:
        self.data["stages"][name] = {**self.stage(name), **fields}
        self.data["updated"] = now()
        self.save()

    def save(self) -> None:
        write_record(self.path, self.data)
