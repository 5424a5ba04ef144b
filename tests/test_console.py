"""The CLI's console: our lines on the console, other libraries' output (Ray's workers and loggers, Ray Data,
warnings) in the log file; --verbose shows everything; an error prints the log's last lines and its path."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import logging, sys, time, warnings
    from stm_ray import console
    path = console.configure("test", verbose=sys.argv[1] == "verbose")
    logging.getLogger("stm_ray.pipeline").info("OUR-LINE")
    logging.getLogger("ray.data").info("RAY-DATA-LINE")
    logging.getLogger("vllm").warning("VLLM-WARNING")
    warnings.warn("A-DEPRECATION", DeprecationWarning, stacklevel=1)
    from deepspeed.utils import logger as ds_logger  # DeepSpeed prints through its own stdout handler
    ds_logger.warning("DS-WARNING")
    if sys.argv[1] == "quiet":  # Ray's part once (the quiet case is the one that reroutes it)
        from stm_ray.ray_setup import init_local_ray
        ray = init_local_ray(num_cpus=1)
        @ray.remote
        def hello():
            print("WORKER-STDOUT", flush=True)
            return 1
        assert ray.get(hello.remote()) == 1
        time.sleep(2)  # the driver's log thread forwards the worker's line
        ray.shutdown()
    print("LOGFILE", path)
""")


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_console_shows_ours_and_files_the_rest(tmp_path, mode):
    env = {**os.environ, "STM_RAY_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    console = p.stdout + p.stderr
    log = open(console.split("LOGFILE ")[1].split()[0], encoding="utf-8").read()
    assert "OUR-LINE" in console and "OUR-LINE" in log
    ray_lines = ("WORKER-STDOUT", "Started a local Ray") if mode == "quiet" else ()
    for noise in ("RAY-DATA-LINE", "VLLM-WARNING", "A-DEPRECATION", "DS-WARNING", *ray_lines):
        assert noise in log, noise
        assert (noise in console) == (mode == "verbose"), (noise, mode)


def test_an_error_prints_the_logs_last_lines(tmp_path, capsys, monkeypatch):
    """An unexpected error: one line naming it, the log's last lines and its path, no traceback on the console."""
    from stm_ray import cli

    monkeypatch.setenv("STM_RAY_CACHE", str(tmp_path / "cache"))

    def boom(args):
        import logging

        logging.getLogger("some.library").info("LIBRARY-SAID-THIS")
        raise RuntimeError("it broke")

    monkeypatch.setitem(cli.COMMANDS, "report", boom)
    import logging

    before = list(logging.getLogger().handlers)
    assert cli.main(["report", str(tmp_path)]) == 1
    assert logging.getLogger().handlers == before  # main leaves the process's logging as it found it
    err = capsys.readouterr().err
    assert "error: RuntimeError: it broke" in err and "LIBRARY-SAID-THIS" in err and "Traceback" not in err
    assert str(tmp_path / "cache" / "logs") in err
