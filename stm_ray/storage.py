"""Run directories on object storage (``s3://``, ``gs://``; ``file://`` for tests and NFS mounts).

The stages read and write plain folders. When ``run_dir`` is a URI, the pipeline works in a staging folder
(``staging_dir``: local on one machine, a filesystem every node mounts on a multi-node cluster) and mirrors it:
:func:`pull` before the first stage (so a rerun resumes from what the bucket holds) and :func:`push` after every
stage (so a lost head node loses at most the running stage). Copies go through ``pyarrow.fs``, which reads the
usual credentials (AWS_* / instance profile; GOOGLE_APPLICATION_CREDENTIALS / workload identity).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMES = ("s3://", "gs://", "gcs://", "file://")
# Scratch that is never worth uploading: Tune's per-trial scratch merges, the staging markers of atomic writes.
_SKIP_PARTS = ("/search/scratch/", "/.tmp-", ".tmp.")


def is_remote(run_dir: str) -> bool:
    return str(run_dir).startswith(SCHEMES)


def staging_path(run_dir: str, staging_dir: str | None) -> Path:
    """Where a remote run is staged: ``<staging_dir>/<scheme>/<bucket>/<path>`` (``s3://b/runs/x`` ->
    ``<staging_dir>/s3/b/runs/x``), so a served model's path on a shared staging volume is predictable."""
    root = Path(staging_dir or os.environ.get("STM_RAY_STAGING") or Path.home() / ".cache" / "stm-ray" / "staging")
    scheme, rest = run_dir.split("://", 1)
    parts = [p for p in rest.split("/") if p not in ("", ".", "..")]
    return root.expanduser() / ("gs" if scheme == "gcs" else scheme) / Path(*parts) if parts else root / scheme


def _fs(uri: str):
    from pyarrow import fs

    if uri.startswith("gcs://"):
        uri = "gs://" + uri[len("gcs://"):]
    return fs.FileSystem.from_uri(uri)


def _files(filesystem, root: str) -> dict[str, int]:
    """{relative path: size} of every file under ``root`` (empty when it does not exist)."""
    from pyarrow import fs

    info = filesystem.get_file_info(root)
    if info.type == fs.FileType.NotFound:
        return {}
    out = {}
    for f in filesystem.get_file_info(fs.FileSelector(root, recursive=True)):
        if f.type == fs.FileType.File:
            out[f.path[len(root.rstrip("/")) + 1:]] = f.size
    return out


def _copy(src_fs, src: str, dst_fs, dst: str, files: list[str]) -> int:
    from pyarrow import fs

    for rel in files:
        target = f"{dst.rstrip('/')}/{rel}"
        dst_fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        fs.copy_files(f"{src.rstrip('/')}/{rel}", target, source_filesystem=src_fs, destination_filesystem=dst_fs)
    return len(files)


def _wanted(rel: str) -> bool:
    return not any(p in "/" + rel for p in _SKIP_PARTS)


def _state_file(local: Path) -> Path:
    return local.parent / f".{local.name}.pushed.json"


def pull(run_dir: str, local: Path) -> int:
    """Copy into ``local`` the files of the remote run it lacks (or holds with another size)."""
    from pyarrow import fs

    remote_fs, root = _fs(run_dir)
    local.mkdir(parents=True, exist_ok=True)
    lfs, lroot = fs.LocalFileSystem(), str(local.resolve())
    have = _files(lfs, lroot)
    todo = [rel for rel, size in sorted(_files(remote_fs, root).items()) if _wanted(rel) and have.get(rel) != size]
    n = _copy(remote_fs, root, lfs, lroot, todo)
    log.info("pulled %d file(s) from %s into %s", n, run_dir, local)
    return n


def push(local: Path, run_dir: str) -> int:
    """Mirror ``local`` to the remote run: files new or changed (size or mtime) since the last push. Nothing is
    deleted remotely."""
    import json

    from pyarrow import fs

    from stm_ray.utils import atomic_write_json

    remote_fs, root = _fs(run_dir)
    state_path = _state_file(local)
    try:
        pushed = json.loads(state_path.read_text()) if state_path.is_file() else {}
    except ValueError:
        pushed = {}
    lroot = str(local.resolve())
    now = {}
    for p in sorted(Path(lroot).rglob("*")):
        if p.is_file():
            rel = p.relative_to(lroot).as_posix()
            if _wanted(rel):
                st = p.stat()
                now[rel] = [st.st_size, st.st_mtime_ns]
    todo = [rel for rel, sig in now.items() if pushed.get(rel) != sig]
    n = _copy(fs.LocalFileSystem(), lroot, remote_fs, root, todo)
    atomic_write_json(state_path, now)
    log.info("pushed %d file(s) from %s to %s", n, local, run_dir)
    return n
