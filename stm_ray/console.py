"""What the console shows, and where everything else goes.

By default (``stm-ray ...`` without ``--verbose``) the console shows stm-ray's own log lines and progress bars; the
output of Ray (its workers' stdout and stderr, its loggers, Ray Data's progress bars, Tune's tables), vLLM,
DeepSpeed, transformers and Python warnings goes to a log file: ``<run_dir>/logs/<time>-<command>.log`` once the
command holds a run, a file under the stm-ray cache before that (``$STM_RAY_CACHE/logs/``). On an error, the CLI
prints that file's last lines and its path. ``--verbose`` shows everything on the console as well (the file is
still written). Library code never calls this module's setup: tests and notebooks keep their own logging.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

OURS = "stm_ray"
_OWN_HANDLERS = ("DeepSpeed",)  # loggers that print through a handler of their own (optuna: see tune/common.py)
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _State:
    verbose = True
    configured = False
    file: Path | None = None
    handler: logging.FileHandler | None = None
    command = "stm-ray"
    run: str | None = None
    saved: tuple[list[logging.Handler], int] = ([], logging.WARNING)


_S = _State()


class _ConsoleFilter(logging.Filter):
    """Our own records at the chosen level; other libraries' only from ERROR up (all of them with --verbose)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _S.verbose or record.name == OURS or record.name.startswith(OURS + "."):
            return True
        return record.levelno >= logging.ERROR


class _ToFile(logging.Filter):
    """On a logger that prints through its own handler: the record goes to our log file, and to that handler only
    with --verbose."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _S.handler is not None and record.levelno >= _S.handler.level:
            _S.handler.handle(record)
        return _S.verbose


def _default_file(command: str) -> Path:
    from stm_ray.modeling.aliases import cache_dir

    stamp = time.strftime("%Y%m%d-%H%M%S")
    return cache_dir() / "logs" / f"{stamp}-{command}-{os.getpid()}.log"


def configure(command: str, *, verbose: bool = False, level: str | int = "INFO") -> Path:
    """Set up the console and the log file for one CLI command (``stm_ray.cli.main`` calls it once)."""
    _S.verbose, _S.command = verbose, command
    root = logging.getLogger()
    if not _S.configured:
        _S.saved = (list(root.handlers), root.level)
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(min(logging.INFO, logging.getLevelName(level) if isinstance(level, str) else level))
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level)
    console.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    console.addFilter(_ConsoleFilter())
    root.addHandler(console)
    _S.file = _default_file(command)
    _open(_S.file)
    logging.captureWarnings(True)  # warnings.warn from libraries: a record of "py.warnings", in the file
    for name in ("tensorboardX", "urllib3", "filelock", "fsspec", "matplotlib", "PIL", "asyncio", "httpcore",
                 "httpx", "botocore", "s3transfer", "numba"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not verbose:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bars too
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's new output prints its config box even at verbose=0
    for name in _OWN_HANDLERS:  # their own stdout handler, no propagation: a filter sends their records to the file
        logging.getLogger(name).addFilter(_ToFile())
    # Ray Data's records go up to our handlers (file; the console shows them with --verbose)
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(Path(__file__).parent / "configs" / "ray_data_logging.yaml"))
    _S.configured = True
    return _S.file


def reset() -> None:
    """Undo :func:`configure` (the CLI's ``main`` calls it on the way out, so that calling ``main`` in a process,
    as tests and notebooks do, leaves that process's logging as it found it)."""
    if not _S.configured:
        return
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        if h is _S.handler:
            h.close()
    handlers, level = _S.saved
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    logging.captureWarnings(False)
    for name in _OWN_HANDLERS:
        for f in [f for f in logging.getLogger(name).filters if isinstance(f, _ToFile)]:
            logging.getLogger(name).removeFilter(f)
    _S.handler, _S.file, _S.run, _S.configured, _S.verbose = None, None, None, False, True


def _open(path: Path) -> None:
    root = logging.getLogger()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    if _S.handler is not None:
        root.removeHandler(_S.handler)
        _S.handler.close()
    root.addHandler(handler)
    _S.handler = handler


def attach_run(run_dir: str | os.PathLike) -> Path | None:
    """From now on the log file is in the run's ``logs/`` folder (what was logged so far is copied there)."""
    if not _S.configured:
        return None
    from stm_ray.storage import run_path

    if _S.run == str(run_dir):
        return _S.file
    _S.run = str(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    new = run_path(run_dir) / "logs" / f"{stamp}-{_S.command}.log"
    new.parent.mkdir(parents=True, exist_ok=True)
    old = _S.file
    if old is not None and old.is_file():
        if _S.handler is not None:
            _S.handler.flush()
        new.write_bytes(old.read_bytes())
    _S.file = new
    _open(new)
    if old is not None and old != new and old.parent.name == "logs" and old.is_file():
        try:
            old.unlink()
        except OSError:
            pass
    return new


def log_file() -> Path | None:
    return _S.file


def configured() -> bool:
    return _S.configured


def verbose() -> bool:
    return _S.verbose or not _S.configured


def tail(lines: int = 25) -> list[str]:
    """The log file's last lines (for an error message)."""
    if _S.file is None or not _S.file.is_file():
        return []
    if _S.handler is not None:
        _S.handler.flush()
    with _S.file.open(encoding="utf-8", errors="replace") as f:
        return [ln.rstrip("\n") for ln in deque(f, maxlen=lines)]


def _write_worker_lines(data: dict[str, Any]) -> None:
    handler = _S.handler
    if handler is None or handler.stream is None:
        return
    lines = data.get("lines") or []
    if data.get("pid") == "autoscaler":  # Ray prints only its events, not the status it logs every 5 s
        try:
            from ray._private.worker import filter_autoscaler_events

            lines = list(filter_autoscaler_events(lines))
        except Exception:  # noqa: BLE001
            lines = []
        if not lines:
            return
    who = data.get("actor_name") or data.get("task_name") or ""
    prefix = f"({who} pid={data.get('pid')}) " if who else f"(pid={data.get('pid')}) "
    try:
        with handler.lock:  # logging.Handler always has one (createLock)
            for line in lines:
                handler.stream.write(prefix + line + "\n")
            handler.stream.flush()
    except (OSError, ValueError):
        pass


def quiet_ray_logging() -> None:
    """Before ``ray.init`` (which logs at once): Ray's loggers go through ours, when the CLI set us up."""
    if _S.configured:
        _reroute_ray_loggers()


def quiet_ray() -> None:
    """After ``ray.init`` in a CLI command: the workers' output goes to the log file (and, only with --verbose, to
    the console too); Ray's loggers go through ours (file; console from ERROR up unless --verbose); without
    --verbose Ray Data shows no progress bars of its own (our stages show one). Without the CLI's setup (tests,
    notebooks) it does nothing."""
    if not _S.configured:
        return
    try:
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        if not _S.verbose:
            dispatcher.remove_handler("ray_print_logs")
        dispatcher.remove_handler("stm_ray_log_file")
        dispatcher.add_handler("stm_ray_log_file", _write_worker_lines)
    except Exception:  # noqa: BLE001 - a Ray without this internal API: its output stays on the console
        logging.getLogger(__name__).debug("Ray's worker output dispatcher not found", exc_info=True)
    _reroute_ray_loggers()
    if _S.verbose:
        return
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    except Exception:  # noqa: BLE001
        pass


def _reroute_ray_loggers() -> None:
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or not (name == "ray" or name.startswith("ray.")):
            continue
        for h in list(logger.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) and \
                    getattr(h, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__):
                logger.removeHandler(h)
        logger.propagate = True
