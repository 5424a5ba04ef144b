"""stm-ray: Synthesize-Train-Merge domain retrievers on Ray."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# A local Ray binds the machine's network address unless Ray's cluster mode is off, and Ray reads that setting once,
# when `ray` is first imported. stm_ray is imported before any of its code can import ray, so it is set here: every
# command and library call that starts a local Ray keeps GCS, raylet, agents and workers on 127.0.0.1. Not when a
# cluster is named (RAY_ADDRESS, or ray already imported by the caller): a driver joining a cluster needs its address.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
if "ray" not in _sys.modules and not _os.environ.get("RAY_ADDRESS") and LOOPBACK_ENV not in _os.environ:
    _os.environ[LOOPBACK_ENV] = "0"
    _os.environ["STM_RAY_SET_LOOPBACK"] = "1"
