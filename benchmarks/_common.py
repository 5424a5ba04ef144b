"""Shared benchmark helpers: machine description and the results JSON layout."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import torch

    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            mem_gib = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gib, "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def claim(name: str, value: float, goal: str, met: bool) -> dict[str, Any]:
    return {"name": name, "value": value, "goal": goal, "met": bool(met)}


def scrub_paths(obj: Any) -> Any:
    """``obj`` with this machine's paths made relative: the repository's to relative paths, its parent's to
    ``../``, the home folder's to ``~`` (results are committed; paths of the machine are not)."""
    root = RESULTS.parents[1]
    prefixes = [(str(root) + os.sep, ""), (str(root.parent) + os.sep, ".." + os.sep), (os.path.expanduser("~"), "~")]
    if isinstance(obj, str):
        for old, new in prefixes:
            obj = obj.replace(old, new)
        return obj
    if isinstance(obj, dict):
        return {scrub_paths(k): scrub_paths(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_paths(v) for v in obj]
    return obj


def write_results(script: str, figures: dict[str, Any], claims: list[dict[str, Any]]) -> Path:
    from stm_ray.utils import atomic_write_text

    out = RESULTS / f"{Path(script).stem}.json"
    data = {"script": Path(script).name, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "figures": scrub_paths(figures), "claims": claims}
    atomic_write_text(out, json.dumps(data, indent=2) + "\n")
    return out


def finish(script: str, figures: dict[str, Any], claims: list[dict[str, Any]]) -> int:
    """The end of a benchmark: write its results JSON, print the claims table and where it went; exit code 0."""
    from stm_ray.tables import format_table

    out = write_results(script, figures, claims)
    print(format_table(claims, ["name", "value", "goal", "met"]))
    print(f"\nwrote {out}")
    return 0


def bm25_shards(out: Path, spec: str, split, *, expert: str, max_rows: int | None = None, seed: int = 13) -> Path:
    """Training shards (the Synthesize schema) from a split's (query, relevant document) pairs with one BM25-mined
    hard negative each (NV-Retriever filter at 0.95 of the positive's score); ``max_rows`` keeps a deterministic
    sample. Written once: a rerun reuses ``out``."""
    import random

    import pyarrow as pa

    from stm_ray.data.shards import write_shard
    from stm_ray.synth.mine import mine_bm25

    if (out / "part-00000.parquet").is_file():
        return out
    pos = {d: i for i, d in enumerate(split.corpus_ids)}
    pairs = [(qi, pos[d]) for qi, qid in enumerate(split.query_ids)
             for d, rel in split.relevant.get(qid, {}).items() if rel > 0 and d in pos]
    if max_rows is not None and len(pairs) > max_rows:
        pairs = sorted(random.Random(seed).sample(pairs, max_rows))
    judged = [{pos[d] for d in split.relevant.get(split.query_ids[q], {}) if d in pos} for q, _ in pairs]
    queries = [split.queries[q] for q, _ in pairs]
    mined = mine_bm25(queries, split.corpus, [[p] for _, p in pairs], judged, depth=50, count=1, margin=0.95)
    rows = [{"query_id": split.query_ids[q], "query": split.queries[q], "positive_id": split.corpus_ids[p],
             "positive": split.corpus[p], "negatives": [split.corpus[j] for j in mined.indices[i]],
             "negative_sources": ["mined-bm25"] * len(mined.indices[i]), "instruction": "", "task": spec,
             "expert": expert} for i, (q, p) in enumerate(pairs)]
    write_shard(pa.Table.from_pylist(rows), out / "part-00000.parquet")
    return out
