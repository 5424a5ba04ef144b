"""The run directory: a local folder, or a prefix on object storage (``s3://``, ``gs://``; ``file://`` for tests)
used directly, with no shared mount assumed.

A run directory is named once (``cfg.run_dir``); each node maps it to its own working copy with :func:`run_path`:
the folder itself for a local run, a node-local cache (``$STM_RAY_CACHE/runs/<scheme>/<bucket>/<path>``) for a
remote one. The object store is the truth; the cache is only what this node fetched or is about to put:

* the driver of ``stm-ray run`` takes the run's lock (:class:`RunLock`), fetches the run exactly
  (:meth:`RunStore.pull`: what the store lacks is removed here, what differs is fetched), and while it runs every
  atomic write under the working copy is put at once (:func:`stm_ray.utils.atomic_write_bytes` calls
  :func:`on_local_write`; a folder written with ``atomic_dir`` is put with its completion marker last). At the end of
  every stage :meth:`RunStore.push` makes the store equal to the working copy: objects of outputs that a redo
  removed are deleted, so no stale object is ever read back.
* Ray Train and Tune write their checkpoints and experiment state to the store themselves (``train/``,
  ``search/tune/``: :data:`STORE_NATIVE`); those prefixes are never mirrored.
* Any other node (a Ray task, a Tune trial, a Serve replica) fetches what it reads: a model folder by its URI
  (:func:`fetch_folder`, checked against the folder's completion marker), a task's synthetic queries by
  :meth:`RunStore.fetch`.

pyarrow's filesystems do the I/O and read the usual credentials (AWS_* / instance profile; Google application
default credentials); ``AWS_ENDPOINT_URL`` points ``s3://`` at an S3-compatible server.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMES = ("s3://", "gs://", "gcs://", "file://")
FORMAT = 1  # the layout version this stm-ray writes; a store written by a newer one is refused
FORMAT_FILE = ".stm-ray-store.json"
LOCK_FILE = ".stm-ray-lock.json"
MARKER = ".stm-ray-complete.json"  # last object of a folder put: a reader waits for it
INDEX_FILE = ".stm-ray-sync.json"  # working copy only: what was last fetched / put, per file
# Written to the store by Ray Train / Tune themselves (their storage_path is the store): never mirrored.
STORE_NATIVE = ("train/", "search/tune/")
# Scratch that is never worth putting: the merge search's trial merges, atomic writes' temporary names.
_SKIP_PARTS = ("/search/scratch/", "/.tmp-", ".tmp.", "/.stm-ray-")


class StoreError(RuntimeError):
    """A run directory that cannot be used: one line naming the URI and what to do."""


def is_remote(run_dir: str | os.PathLike) -> bool:
    return str(run_dir).startswith(SCHEMES)


def cache_dir() -> Path:
    return Path(os.environ.get("STM_RAY_CACHE", Path.home() / ".cache" / "stm-ray")).expanduser()


def run_path(run_dir: str | os.PathLike) -> Path:
    """This node's working copy of ``run_dir``: the folder itself, or ``$STM_RAY_CACHE/runs/<scheme>/<bucket>/<path>``
    for a URI (node-local: nothing assumes another node sees it)."""
    run_dir = str(run_dir)
    if not is_remote(run_dir):
        return Path(run_dir).expanduser()
    scheme, rest = run_dir.split("://", 1)
    parts = [p for p in rest.split("/") if p not in ("", ".", "..")]
    return cache_dir() / "runs" / ("gs" if scheme == "gcs" else scheme) / Path(*parts)


def _wanted(rel: str) -> bool:
    return not rel.startswith(STORE_NATIVE) and not any(p in "/" + rel for p in _SKIP_PARTS)


def _filesystem(uri: str):
    from pyarrow import fs

    if uri.startswith("gcs://"):
        uri = "gs://" + uri[len("gcs://"):]
    try:
        return fs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as e:
        raise StoreError(_explain(uri, e)) from None


def _explain(uri: str, e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    low = str(e).lower()
    if "nosuchbucket" in low or "bucket does not exist" in low or ("bucket" in low and "not found" in low):
        what = "the bucket does not exist: create it, or fix run_dir"
    elif "credential" in low or "accessdenied" in low or "access denied" in low or "forbidden" in low or "403" in low:
        what = "access denied or no credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or an instance " \
               "profile / GOOGLE_APPLICATION_CREDENTIALS) with read-write access to it"
    elif "region" in low:
        what = "could not resolve the bucket's region: set AWS_REGION (and AWS_ENDPOINT_URL for an S3-compatible server)"
    elif "connect" in low or "curl" in low or "timed out" in low or "resolve" in low:
        what = "cannot reach the storage endpoint: check the network, AWS_ENDPOINT_URL or the URI"
    else:
        what = "cannot use it"
    return f"run_dir {uri}: {what} ({msg})"


class RunStore:
    """A run directory and this node's working copy of it (:func:`run_path`). For a local folder every method is
    a no-op: the folder is the run."""

    def __init__(self, run_dir: str | os.PathLike):
        self.uri = str(run_dir).rstrip("/")
        self.remote = is_remote(self.uri)
        self.local = run_path(self.uri)
        self._fs = None
        self._root = ""
        self._index_lock = threading.Lock()

    # -- the remote side ---------------------------------------------------------------------------------------
    @property
    def fs(self):
        if self._fs is None:
            self._fs, self._root = _filesystem(self.uri)
            self._root = self._root.rstrip("/")
        return self._fs

    @property
    def root(self) -> str:
        _ = self.fs
        return self._root

    def uri_of(self, path: str | os.PathLike) -> str:
        """The reference another node can use for ``path`` (under the working copy): its URI for a remote run,
        the path itself otherwise."""
        rel = self._rel(path) if self.remote else None
        if rel is None:
            return str(path)
        return f"{self.uri}/{rel}" if rel != "." else self.uri

    def _rel(self, path: str | os.PathLike) -> str | None:
        """``path`` relative to the working copy; None when it is not an absolute path in it (an alias or hub id
        is not a path: it is never resolved against the working directory)."""
        p = Path(path)
        if not p.is_absolute():
            return None
        try:
            return p.resolve().relative_to(self.local.resolve()).as_posix()
        except ValueError:
            return None

    def _remote_files(self, prefix: str = "") -> dict[str, tuple[int, int]]:
        """{relative path: (size, modification second)} of the objects under ``prefix``."""
        from pyarrow import fs

        base = f"{self.root}/{prefix}".rstrip("/")
        try:
            info = self.fs.get_file_info(base)
            if info.type == fs.FileType.NotFound:
                return {}
            if info.type == fs.FileType.File:
                return {prefix: (info.size, _ns(info.mtime))}
            out = {}
            for f in self.fs.get_file_info(fs.FileSelector(base, recursive=True)):
                if f.type == fs.FileType.File:
                    out[f.path[len(self.root) + 1:]] = (f.size, _ns(f.mtime))
            return out
        except OSError as e:
            raise StoreError(_explain(self.uri, e)) from None

    def check(self) -> None:
        """Reachable, the bucket exists, we may write, and no newer stm-ray wrote it; else one clear line."""
        if not self.remote:
            return
        from pyarrow import fs

        bucket = self.root.split("/", 1)[0]
        try:
            if self.uri.startswith("file://"):  # a folder standing in for a bucket (tests, a mounted volume)
                self.fs.create_dir(self.root, recursive=True)
            info = self.fs.get_file_info(self.root if self.uri.startswith("file://") else bucket)
        except OSError as e:
            raise StoreError(_explain(self.uri, e)) from None
        if info.type == fs.FileType.NotFound:
            raise StoreError(f"run_dir {self.uri}: the bucket {bucket!r} does not exist: create it, or fix run_dir")
        fmt = self.read_json(FORMAT_FILE)
        if fmt and int(fmt.get("format", 0)) > FORMAT:
            raise StoreError(f"run_dir {self.uri} was written by a newer stm-ray ({fmt.get('stm_ray')}, layout "
                             f"{fmt.get('format')} > {FORMAT}): upgrade stm-ray, or use another run_dir")
        if not fmt:
            from stm_ray import __version__

            self.write_json(FORMAT_FILE, {"format": FORMAT, "stm_ray": __version__})

    def read_json(self, rel: str) -> dict[str, Any] | None:
        try:
            with self.fs.open_input_stream(f"{self.root}/{rel}") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("%s/%s is not valid JSON; ignored", self.uri, rel)
            return None
        except OSError as e:
            if "not found" in str(e).lower() or "nosuchkey" in str(e).lower():
                return None
            raise StoreError(_explain(self.uri, e)) from None

    def write_json(self, rel: str, obj: Any) -> None:
        self._put_bytes(rel, (json.dumps(obj, indent=2) + "\n").encode())

    def _put_bytes(self, rel: str, data: bytes) -> None:
        target = f"{self.root}/{rel}"
        try:
            if self.uri.startswith("file://"):  # a local filesystem: temp name then rename, like an object put
                self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
                tmp = f"{target}.tmp.{uuid.uuid4().hex[:8]}"
                with self.fs.open_output_stream(tmp) as f:
                    f.write(data)
                self.fs.move(tmp, target)
            else:  # one PUT: an object appears whole or not at all
                with self.fs.open_output_stream(target) as f:
                    f.write(data)
        except OSError as e:
            raise StoreError(_explain(self.uri, e)) from None

    def _put_file(self, rel: str, path: Path) -> None:
        self._put_bytes(rel, path.read_bytes())

    def _get_file(self, rel: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out, self.fs.open_input_stream(f"{self.root}/{rel}") as f:
                shutil.copyfileobj(f, out, 1 << 20)
            os.replace(tmp, dest)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def delete(self, rel: str) -> None:
        """Remove ``rel`` (a file or a folder) from the store and the working copy."""
        from pyarrow import fs

        local = self.local / rel
        if local.is_dir():
            shutil.rmtree(local, ignore_errors=True)
        elif local.exists():
            local.unlink()
        if not self.remote:
            return
        target = f"{self.root}/{rel}".rstrip("/")
        info = self.fs.get_file_info(target)
        if info.type == fs.FileType.Directory:
            self.fs.delete_dir(target)
        elif info.type == fs.FileType.File:
            self.fs.delete_file(target)
        with self._index_lock:
            index = self._index()
            for k in [k for k in index if k == rel or k.startswith(rel.rstrip("/") + "/")]:
                del index[k]
            self._save_index(index)

    def list_dirs(self, rel: str) -> list[str]:
        """Names of the folders directly under ``rel`` (on the store for a remote run)."""
        from pyarrow import fs

        if not self.remote:
            d = self.local / rel
            return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []
        try:
            infos = self.fs.get_file_info(fs.FileSelector(f"{self.root}/{rel}", allow_not_found=True))
        except OSError as e:
            raise StoreError(_explain(self.uri, e)) from None
        return sorted(i.base_name for i in infos if i.type == fs.FileType.Directory)

    # -- the working copy's index: what was last fetched or put, so a sync moves only what changed -------------------
    def _index(self) -> dict[str, dict[str, list[int]]]:
        try:
            return json.loads((self.local / INDEX_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def _save_index(self, index: dict) -> None:
        self.local.mkdir(parents=True, exist_ok=True)
        tmp = self.local / f".{INDEX_FILE}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_text(json.dumps(index))
        os.replace(tmp, self.local / INDEX_FILE)

    def _local_files(self, prefix: str = "") -> dict[str, tuple[int, int]]:
        base = self.local / prefix if prefix else self.local
        if base.is_file():
            return {prefix: _sig(base)}
        if not base.is_dir():
            return {}
        return {p.relative_to(self.local).as_posix(): _sig(p) for p in base.rglob("*") if p.is_file()}

    def pull(self, prefix: str = "") -> tuple[int, int]:
        """Make the working copy (under ``prefix``) equal to the store: fetch what differs, remove what the store
        does not hold. Returns (files fetched, files removed)."""
        if not self.remote:
            return 0, 0
        remote = {r: s for r, s in self._remote_files(prefix).items() if _wanted(r)}
        with self._index_lock:
            index = self._index()
            fetched = removed = 0
            for rel, sig in sorted(remote.items()):
                have = index.get(rel)
                lp = self.local / rel
                if have and have.get("remote") == list(sig) and lp.is_file() and _sig(lp) == tuple(have["local"]):
                    continue
                self._get_file(rel, lp)
                index[rel] = {"remote": list(sig), "local": list(_sig(lp))}
                fetched += 1
            for rel in self._local_files(prefix):
                if _wanted(rel) and rel not in remote:
                    (self.local / rel).unlink(missing_ok=True)
                    index.pop(rel, None)
                    removed += 1
            for rel in [r for r in index if r.startswith(prefix) and r not in remote]:
                index.pop(rel)
            self._save_index(index)
        _prune_empty(self.local / prefix if prefix else self.local)
        return fetched, removed

    def push(self, prefix: str = "") -> tuple[int, int]:
        """Make the store (under ``prefix``) equal to the working copy: put what changed since it was last put or
        fetched, delete objects the working copy no longer has. Returns (files put, objects deleted)."""
        if not self.remote:
            return 0, 0
        local = {r: s for r, s in self._local_files(prefix).items() if _wanted(r)}
        remote = {r: s for r, s in self._remote_files(prefix).items() if _wanted(r)}
        with self._index_lock:
            index = self._index()
            put = deleted = 0
            for rel, sig in sorted(local.items()):
                have = index.get(rel)
                if have and tuple(have.get("local", ())) == sig and tuple(have.get("remote", ())) == remote.get(rel):
                    continue
                self._put_file(rel, self.local / rel)
                index[rel] = {"local": list(sig), "remote": list(self._remote_sig(rel))}
                put += 1
            for rel in remote:
                if rel not in local:
                    self.fs.delete_file(f"{self.root}/{rel}")
                    index.pop(rel, None)
                    deleted += 1
            self._save_index(index)
        return put, deleted

    def _remote_sig(self, rel: str) -> tuple[int, int]:
        info = self.fs.get_file_info(f"{self.root}/{rel}")
        return info.size, _ns(info.mtime)

    def put(self, path: str | os.PathLike) -> None:
        """Put one file or folder of the working copy now (a folder: its files, objects it no longer has deleted,
        then its completion marker last)."""
        if not self.remote:
            return
        p = Path(path)
        rel = self._rel(p)
        if rel is None or not _wanted(rel):
            return
        if p.is_dir():
            try:  # a reader must not take the folder for complete while it is rewritten
                self.fs.delete_file(f"{self.root}/{rel}/{MARKER}")
            except (FileNotFoundError, OSError):
                pass
            self.push(rel)
            self.write_json(f"{rel}/{MARKER}", {"written": time.time()})
        elif p.is_file():
            with self._index_lock:
                self._put_file(rel, p)
                index = self._index()
                index[rel] = {"local": list(_sig(p)), "remote": list(self._remote_sig(rel))}
                self._save_index(index)

    def fetch(self, rel: str) -> Path:
        """This node's copy of ``rel`` (a file or folder of the run), fetched exactly from the store when remote.
        In the process that holds the run (its working copy is where the run writes), the copy is taken as is."""
        held = _ACTIVE
        if self.remote and not (held is not None and held.uri == self.uri):
            self.pull(rel)
        return self.local / rel


def _sig(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_size, st.st_mtime_ns


def _ns(mtime) -> int:
    # whole seconds: an object's listing gives milliseconds, its HEAD whole seconds
    return int(mtime.timestamp()) if mtime is not None else 0


def _prune_empty(root: Path) -> None:
    if not root.is_dir():
        return
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:
            pass


def fetch_folder(uri: str) -> str:
    """A folder on object storage (a model: ``s3://bucket/run/merged``) in this node's cache: refused until its
    completion marker (put last by its writer) is there, then fetched exactly (what changed since the last fetch;
    files the folder no longer has removed)."""
    store = RunStore(uri)
    if store.read_json(MARKER) is None:
        raise FileNotFoundError(f"{uri}: no complete folder there (no {MARKER}: missing, or still being written)")
    fetched, removed = store.pull()
    if fetched or removed:
        log.info("fetched %s into %s (%d file(s), %d removed)", uri, store.local, fetched, removed)
    return str(store.local)


# -- the active run: atomic writes under its working copy are put at once -------------------------------------------
_ACTIVE: RunStore | None = None


def activate(store: RunStore | None) -> None:
    """Make ``store`` the run whose working copy's atomic writes are put at once (None: none)."""
    global _ACTIVE
    _ACTIVE = store if store is not None and store.remote else None


def active() -> RunStore | None:
    return _ACTIVE


def on_local_write(path: Path) -> None:
    """Called after an atomic write (file or folder): put it when it lies in the active run's working copy."""
    store = _ACTIVE
    if store is not None:
        store.put(path)


def reference(path: str | os.PathLike) -> str:
    """How another node names ``path``: its URI when it lies in the active remote run's working copy."""
    store = _ACTIVE
    return store.uri_of(path) if store is not None else str(path)


def native_uri(run_dir: str, rel: str) -> str:
    """Where Ray Train / Tune keep ``rel`` (under :data:`STORE_NATIVE`): the store itself for a remote run, the
    folder for a local one."""
    if is_remote(run_dir):
        uri = str(run_dir).rstrip("/")
        return f"{uri}/{rel}" if not uri.startswith("file://") else f"{uri[len('file://'):]}/{rel}"
    return str((run_path(run_dir) / rel).resolve())


def _dead_here(held: dict) -> bool:
    """The lock's owner ran on this host and its process is gone (a killed run): no need to wait for staleness."""
    if held.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(held.get("pid", 0)), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        return False
    return False


# -- one run at a time on a run directory ----------------------------------------------------------------------------
class RunLock:
    """``<run_dir>/.stm-ray-lock.json``: owner and heartbeat of the run using the run directory. A second run is
    refused while the heartbeat is fresh; a lock whose heartbeat is older than ``stale_s`` (its owner died) is
    taken over, with a warning. Object stores have no atomic create here, so two runs starting in the same
    second can both take it: the lock stops the common mistake, not a race."""

    def __init__(self, store: RunStore, *, heartbeat_s: float = 20.0, stale_s: float = 90.0):
        self.store, self.heartbeat_s, self.stale_s = store, heartbeat_s, stale_s
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex[:12]}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        if self.store.remote:
            return self.store.read_json(LOCK_FILE)
        try:
            return json.loads((self.store.local / LOCK_FILE).read_text())
        except (OSError, ValueError):
            return None

    def _write(self) -> None:
        rec = {**self.owner, "heartbeat": time.time()}
        if self.store.remote:
            self.store.write_json(LOCK_FILE, rec)
        else:
            from stm_ray.utils import atomic_write_json

            atomic_write_json(self.store.local / LOCK_FILE, rec)

    def acquire(self) -> None:
        held = self._read()
        if held and held.get("id") != self.owner["id"]:
            age = time.time() - float(held.get("heartbeat", 0))
            if age < self.stale_s and not _dead_here(held):
                raise StoreError(f"run_dir {self.store.uri} is in use by another run (host {held.get('host')}, pid "
                                 f"{held.get('pid')}, heartbeat {age:.0f} s ago): wait for it, stop it, or use "
                                 f"another run_dir; a lock unrefreshed for {self.stale_s:.0f} s is taken over")
            log.warning("run_dir %s: taking over a stale lock of host %s pid %s (no heartbeat for %.0f s)",
                        self.store.uri, held.get("host"), held.get("pid"), age)
        self._write()
        confirmed = self._read()
        if (confirmed or {}).get("id") != self.owner["id"]:
            raise StoreError(f"run_dir {self.store.uri}: another run took the lock at the same moment; retry")
        self._thread = threading.Thread(target=self._beat, name="stm-ray-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write()
            except Exception as e:  # noqa: BLE001 - a missed beat is retried; the run goes on
                log.warning("run lock heartbeat failed: %s", e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self._read()
        if held and held.get("id") == self.owner["id"]:
            if self.store.remote:
                self.store.fs.delete_file(f"{self.store.root}/{LOCK_FILE}")
            else:
                (self.store.local / LOCK_FILE).unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_run_dir(run_dir: str) -> None:
    """A relative run_dir in a Ray job's working directory would land in Ray's per-package temp folder (a code
    edit changes its hash, and a resubmitted job starts from zero): refuse it with what to write instead."""
    if is_remote(run_dir) or Path(run_dir).expanduser().is_absolute():
        return
    cwd = Path.cwd().as_posix()
    if "/runtime_resources/" in cwd and ("working_dir_files" in cwd or "_ray_pkg_" in cwd):
        raise StoreError(f"run_dir {run_dir!r} is relative, and this Ray job runs in Ray's temporary copy of its "
                         f"working_dir ({cwd}): a resubmitted job would start from zero. Give an absolute path "
                         f"(e.g. run_dir=~/stm-ray-runs/{Path(run_dir).name}) or object storage (run_dir=s3://BUCKET/"
                         f"{Path(run_dir).name})")


class RunSession:
    """One command's use of a run directory: lock it, fetch the working copy exactly, put every atomic write at
    once while it runs (:func:`activate`), and make the store equal to the working copy on :meth:`sync` and at the
    end. A local folder is only locked."""

    def __init__(self, run_dir: str, *, lock: bool = True):
        check_run_dir(run_dir)
        self.store = RunStore(run_dir)
        self.nested = _ACTIVE_URIS.get(self.store.uri, 0) > 0  # this process holds it already (demo -> run)
        self.lock = RunLock(self.store) if lock and not self.nested else None

    def __enter__(self) -> RunSession:
        _ACTIVE_URIS[self.store.uri] = _ACTIVE_URIS.get(self.store.uri, 0) + 1
        if self.nested:
            return self
        try:
            self.store.check()
            self.store.local.mkdir(parents=True, exist_ok=True)
            if self.lock is not None:
                self.lock.acquire()
        except BaseException:
            _ACTIVE_URIS[self.store.uri] -= 1
            raise
        try:
            if self.store.remote:
                fetched, removed = self.store.pull()
                log.info("run_dir %s: working copy %s (%d file(s) fetched, %d removed)", self.store.uri,
                         self.store.local, fetched, removed)
            activate(self.store)
            from stm_ray.console import attach_run

            attach_run(self.store.uri)  # a CLI command's log file: <run>/logs/
        except BaseException:
            _ACTIVE_URIS[self.store.uri] -= 1
            if self.lock is not None:
                self.lock.release()
            raise
        return self

    def sync(self) -> None:
        if self.store.remote:
            put, deleted = self.store.push()
            if put or deleted:
                log.info("run_dir %s: %d file(s) put, %d stale object(s) deleted", self.store.uri, put, deleted)

    def __exit__(self, *exc) -> None:
        _ACTIVE_URIS[self.store.uri] -= 1
        if self.nested:
            return
        try:
            self.sync()
        finally:
            activate(None)
            if self.lock is not None:
                self.lock.release()


_ACTIVE_URIS: dict[str, int] = {}


def dir_exists(path_or_uri: str) -> bool:
    """Whether a folder exists: a local one, or a prefix holding objects on a store."""
    if not is_remote(path_or_uri):
        return Path(path_or_uri).is_dir()
    from pyarrow import fs

    filesystem, root = _filesystem(path_or_uri)
    return filesystem.get_file_info(root.rstrip("/")).type == fs.FileType.Directory


def remove_dir(path_or_uri: str) -> None:
    """Remove a folder, local or on a store (nothing there is fine)."""
    if not is_remote(path_or_uri):
        shutil.rmtree(path_or_uri, ignore_errors=True)
        return
    from pyarrow import fs

    filesystem, root = _filesystem(path_or_uri)
    if filesystem.get_file_info(root.rstrip("/")).type == fs.FileType.Directory:
        filesystem.delete_dir(root.rstrip("/"))
