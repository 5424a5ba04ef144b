"""Merge retrievers with mergekit's Python API (``run_merge``); the output is a sentence-transformers folder.

Every input is a full Hugging Face folder in the same layout: the experts written by ``train_experts`` (LoRA
already folded in) and the base model written once by :func:`prepare_base` through the same :meth:`Embedder.save`
(so that base and experts name their tensors alike, e.g. a bare ``LlamaModel`` rather than the hub's
``LlamaForCausalLM``). mergekit merges the weights; the sentence-transformers files (pooling, normalisation, query
prompt) and the tokenizer come from the first expert.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from stm_ray.records import read_record
from stm_ray.utils import atomic_dir

log = logging.getLogger(__name__)

METHODS = {
    "linear": "weighted average of the models (weights normalised to sum 1); no base model",
    "ties": "TIES: task vectors against the base, trimmed to a density, sign consensus, then summed with weights",
    "dare_ties": "DARE-TIES: random drop to a density with rescaling, then TIES's sign consensus",
    "task_arithmetic": "weighted sum of task vectors (expert - base) added to the base",
}
USES_DENSITY = frozenset({"ties", "dare_ties"})
USES_BASE = frozenset({"ties", "dare_ties", "task_arithmetic"})
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")
_NOT_COPIED = {"config.json", "metrics.json", "loss.png", "README.md", "merge.json", "mergekit_config.yml"}


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; methods: {', '.join(METHODS)}")


def prepare_base(model_cfg, out: str | Path) -> Path:
    """Write the base model once as an Embedder folder (the layout the experts have); reused when present."""
    from stm_ray.modeling import Embedder
    from stm_ray.modeling.embedder import META_FILE

    out = Path(out)
    if (out / META_FILE).is_file():
        return out
    emb = Embedder.from_config(model_cfg.model_copy(update={"device": "cpu", "dtype": "float32"}))
    return emb.save(out)


def mergekit_config(method: str, weights: dict[str, float], *, base: str | None = None,
                    density: float | None = None, dtype: str = "float32") -> dict[str, Any]:
    """The mergekit configuration for ``method`` over {model folder: weight}; weight-0 models are left out."""
    check_method(method)
    kept = {p: float(w) for p, w in weights.items() if w > 0}
    models = []
    for path, w in kept.items():
        params: dict[str, Any] = {"weight": w}
        if method in USES_DENSITY:
            params["density"] = 1.0 if density is None else float(density)
        models.append({"model": path, "parameters": params})
    cfg: dict[str, Any] = {"merge_method": method, "dtype": dtype, "models": models}
    if method in USES_BASE:
        if not base:
            raise ValueError(f"merge method {method!r} needs a base model")
        cfg["base_model"] = base
    if method in ("linear", "ties", "dare_ties"):
        cfg["parameters"] = {"normalize": True}
    return cfg


def _matryoshka_dims(folder: str | Path) -> list[int]:
    from stm_ray.modeling.embedder import META_FILE

    return (read_record(Path(folder) / META_FILE, kind="model metadata") or {}).get("matryoshka_dims") or []


def _copy_support_files(src: Path, dst: Path) -> None:
    for item in src.iterdir():
        if item.name in _NOT_COPIED or item.name.startswith(".") or item.suffix in _WEIGHT_FILES:
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, dst / item.name)


@contextlib.contextmanager
def _quiet_logs():
    """mergekit logs every planning step at INFO, partly through the root logger: keep a search's log readable."""
    root, mk = logging.getLogger(), logging.getLogger("mergekit")
    levels = root.level, mk.level
    root.setLevel(max(root.level, logging.WARNING))
    mk.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(levels[0])
        mk.setLevel(levels[1])


def merge_models(method: str, weights: dict[str, float], out: str | Path, *, base: str | None = None,
                 density: float | None = None, dtype: str = "float32", query_instruction: str | None = None,
                 seed: int = 13, metadata: dict[str, Any] | None = None, fingerprint: str | None = None) -> Path:
    """Merge ``weights`` ({model folder: weight}, 0 = dropped) with mergekit into ``out`` (atomically).

    With every weight 0 the result is the base model itself (a copy). The folder loads in
    ``SentenceTransformer(out)``; ``fingerprint`` is recorded in its ``stm_ray.json``; ``query_instruction`` (when given; a sentence becomes an ``Instruct: ...\\nQuery: ``
    prefix) becomes its query prompt.
    """
    import torch
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from stm_ray.merge.compat import install
    from stm_ray.modeling.aliases import resolve_model
    from stm_ray.modeling.embedder import META_FILE, save_query_prompt

    install()
    out = Path(out)
    # references (an object-store URI of an expert) become this node's folders
    weights = {resolve_model(p) if w > 0 else p: w for p, w in weights.items()}
    base = resolve_model(base) if base else base
    kept = [p for p, w in weights.items() if w > 0]
    with atomic_dir(out) as tmp:
        if not kept:
            if not base:
                raise ValueError("every weight is 0 and there is no base model to fall back on")
            shutil.copytree(base, tmp, dirs_exist_ok=True)
        else:
            mk = mergekit_config(method, weights, base=base, density=density, dtype=dtype)
            options = MergeOptions(device="cpu", copy_tokenizer=False, lazy_unpickle=False, random_seed=seed,
                                   write_model_card=False, quiet=True, num_threads=torch.get_num_threads())
            with _quiet_logs():
                run_merge(MergeConfiguration.model_validate(mk), out_path=str(tmp), options=options)
            _copy_support_files(Path(kept[0]), tmp)
        meta_path = tmp / META_FILE
        meta = read_record(meta_path, kind="model metadata") or {}
        meta["merge"] = {"method": method, "weights": weights, "density": density, "base": base, **(metadata or {})}
        if meta.get("matryoshka_dims") or any(_matryoshka_dims(p) for p in kept):
            # the dimensions every merged model was trained for (the first expert's metadata was copied)
            common = set.intersection(*(set(_matryoshka_dims(p)) for p in kept)) if kept else set()
            meta["matryoshka_dims"] = sorted(common, reverse=True) or None
            st_cfg = tmp / "config_sentence_transformers.json"
            if st_cfg.is_file():
                doc = json.loads(st_cfg.read_text())
                doc.pop("matryoshka_dims", None)
                if meta["matryoshka_dims"]:
                    doc["matryoshka_dims"] = meta["matryoshka_dims"]
                st_cfg.write_text(json.dumps(doc, indent=2) + "\n")
        if fingerprint is not None:  # the merge search's fingerprint (what model_fingerprint reads)
            meta["fingerprint"] = fingerprint
        else:
            meta.pop("fingerprint", None)  # the first expert's, copied with its support files
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        if query_instruction is not None:
            save_query_prompt(tmp, query_instruction)
    return out
