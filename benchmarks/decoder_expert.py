"""The decoder-LLM retriever for real: SmolLM2-135M experts with the STM settings, merged, scored, loaded elsewhere.

STM's retrievers are decoder LLMs with bidirectional attention, EOS pooling and LoRA. This script trains two of them
from the `smollm2` alias (SmolLM2-135M-Instruct) on a CPU:

  1. training shards: SciFact train and icd10 train pairs, one BM25-mined hard negative each (the Synthesize
     schema), ``--rows`` sampled pairs per task (deterministic);
  2. experts (Ray Train, one worker with every CPU thread): ``model.bidirectional=true`` (EOS pooling, the decoder
     default), LoRA r=16 / alpha=32 on every linear layer, GradCache (``train.grad_cache``), global batch ``--batch``,
     ``--max-length`` tokens, ``--epochs`` epochs;
  3. a MiniLM expert on the same SciFact rows and settings (no GradCache needed) for comparison;
  4. the two SmolLM2 experts merged by mergekit (linear, 0.5 / 0.5: mergekit's Llama path) into a
     sentence-transformers folder;
  5. NDCG@10 on SciFact test (300 queries) and icd10 test (``--icd-queries`` queries), each in a pooled corpus
     (``--sci-corpus`` / ``--icd-corpus`` documents: every judged document, BM25's top few per query, a random fill):
     a 135M decoder encodes ~4 documents/s of 128 tokens on 2 cores, so SciFact's 5,183 documents would take
     ~20 min per model and icd10's 46,881 codes longer. Every model is scored on the same pools, so the rows
     compare; the figures are higher than full-corpus ones. Rows: SmolLM2 bidirectional untrained (and with
     ``--with-causal`` SmolLM2 as it ships: causal, EOS), each SmolLM2 expert, the merge, MiniLM base and expert;
  6. the merged folder loaded in sentence-transformers and in vLLM (pooling runner, CPU), each compared with our
     Embedder's vectors.

No goals were set numerically for this part of issue 23: the results table is the record, with two checks computed
as claims (the SciFact expert beats its untrained base; the merge loads in sentence-transformers and vLLM with the
same vectors).

    python benchmarks/decoder_expert.py [--scifact DIR] [--rows 512] [--max-length 64] [--batch 16] [--epochs 1]

Why these defaults: on this CPU one SmolLM2 step at batch 32 and 128 tokens (one positive and one negative per
query, GradCache) takes ~90 s, and 8 such steps left the decoder near random (its untrained EOS embedding is no
retriever at all: SciFact NDCG@10 0.005 in the pool; the first run, recorded in benchmarks/README.md). A decoder
needs steps more than long texts: 64 tokens and batch 16 make a step ~4x cheaper, so 512 rows give 32 steps per
expert and the whole script stays under an hour.

Writes benchmarks/results/decoder_expert.json (work files under runs/bench/decoder_expert/; each finished part is
cached there, so a rerun resumes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import bm25_shards, claim, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RAY_ENV = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}

VLLM_CHECK = """
import sys, json
import numpy as np
from vllm import LLM
from stm_ray.modeling import Embedder
from stm_ray.modeling.vllm_engine import cpu_engine_kwargs
path, max_len = sys.argv[1], int(sys.argv[2])  # vLLM caps max_model_len at the folder's max_seq_length
texts = ["asthma in children", "femur fracture of the left leg", "vitamin D and bone density"]
kw = cpu_engine_kwargs(path, max_model_len=max_len, max_num_seqs=8, kv_cache_gib=None, field="kv_cache_gib")
llm = LLM(model=path, runner="pooling", **kw)
v = np.array([o.outputs.embedding for o in llm.embed(texts)])
ours = Embedder.from_pretrained(path, device="cpu").encode_corpus(texts)
print("RESULT", json.dumps({"shape": list(v.shape), "max_diff": float(np.abs(v - ours).max())}))
"""


def train(work: Path, name: str, model: str, shards: Path, args, *extra: str) -> dict:
    import ray

    from stm_ray.config import load_config
    from stm_ray.ray_setup import init_local_ray
    from stm_ray.train import train_experts

    done = work / f"train-{name}.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg = load_config(None, [f"run_dir={work / ('run-' + name)}", f"model.name_or_path={model}",
                             f"model.max_length={args.max_length}", f"train.shards={shards}",
                             f"train.epochs={args.epochs}", f"train.batch_size={args.batch}",
                             "train.negatives_per_query=1", "train.warmup_ratio=0.1",
                             f"train.learning_rate={args.lr}", "train.evaluate_dev=false",
                             f"train.cpus_per_worker={os.cpu_count() or 2}", "train.checkpoint_every=100000", *extra])
    ray.shutdown()
    init_local_ray(num_cpus=os.cpu_count() or 2, runtime_env=RAY_ENV)
    t0 = time.perf_counter()
    try:
        [res] = train_experts(cfg)
    finally:
        ray.shutdown()
    rep = {"name": name, "path": res.path, "steps": res.steps, "rows": res.rows, "final_loss": res.final_loss,
           "samples_per_s": res.samples_per_s, "peak_memory_gib": res.peak_memory_gib,
           "wall_s": time.perf_counter() - t0, "overrides": list(extra)}
    done.write_text(json.dumps(rep, indent=2))
    return rep


def score(work: Path, name: str, model: str, splits: dict, max_length: int, **kw) -> dict:
    from stm_ray.eval.evaluate import evaluate_split
    from stm_ray.modeling import Embedder

    done = work / f"eval-{name.replace('/', '-')}.json"
    if done.is_file():
        return json.loads(done.read_text())
    emb = Embedder.from_pretrained(model, max_length=max_length, **kw)
    rep = {"name": name, "model": model, "pooling": emb.pooling, "bidirectional": emb.bidirectional}
    for label, sp in splits.items():
        t0 = time.perf_counter()
        rep[label] = evaluate_split(emb, sp, show_progress=True).ndcg_at_10
        rep[f"{label}_seconds"] = time.perf_counter() - t0
    done.write_text(json.dumps(rep, indent=2))
    return rep


def loads_elsewhere(work: Path, merged: str, max_length: int) -> dict:
    """sentence-transformers and vLLM read the merged folder and give our vectors."""
    done = work / "loads.json"
    if done.is_file():
        return json.loads(done.read_text())
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from stm_ray.modeling import Embedder

    texts = ["asthma in children", "femur fracture of the left leg", "vitamin D and bone density"]
    st = SentenceTransformer(merged, device="cpu").encode(texts, normalize_embeddings=True)
    ours = Embedder.from_pretrained(merged, device="cpu").encode_corpus(texts)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", VLLM_CHECK, merged, str(max_length)], capture_output=True, text=True, timeout=900,
                       env=env)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    vllm = json.loads(line[7:]) if line else {"error": r.stderr[-2000:]}
    rep = {"sentence_transformers_max_diff": float(np.abs(st - ours).max()), "vllm": vllm}
    if "error" not in vllm:  # a failed check is not cached: the next run tries again
        done.write_text(json.dumps(rep, indent=2))
    return rep


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scifact", default=os.environ.get("STM_RAY_SCIFACT", str(ROOT.parent / "shared" / "data" / "scifact")))
    ap.add_argument("--rows", type=int, default=512, help="training pairs per task (sampled)")
    ap.add_argument("--max-length", type=int, default=64, help="tokens per text, training and evaluation")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16, help="global batch (queries)")
    ap.add_argument("--lr", type=float, default=5e-4, help="learning rate (LoRA; few steps; 10%% warm-up)")
    ap.add_argument("--chunk", type=int, default=8, help="GradCache mini-batch (queries)")
    ap.add_argument("--icd-queries", type=int, default=200)
    ap.add_argument("--icd-corpus", type=int, default=2000)
    ap.add_argument("--sci-corpus", type=int, default=1000, help="SciFact test pool size (judged + BM25 + fill)")
    ap.add_argument("--pool-depth", type=int, default=3, help="BM25 top-k per query in the pools")
    ap.add_argument("--with-causal", action="store_true", help="also score SmolLM2 as it ships (causal attention)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench" / "decoder_expert"))
    args = ap.parse_args()
    if not (Path(args.scifact) / "corpus.jsonl").is_file():
        print(f"SciFact not found at {args.scifact}; pass --scifact DIR (a BEIR folder)", file=sys.stderr)
        return 2
    from stm_ray.config import ModelConfig
    from stm_ray.data import load_task
    from stm_ray.merge import merge_models
    from stm_ray.merge.mergekit_run import prepare_base
    from stm_ray.modeling.aliases import smollm2_path
    from stm_ray.tune.dev import pooled_split
    from stm_ray.utils import setup_logging

    setup_logging()
    # cached parts live in a folder named by every setting that changes them: a rerun with other settings never
    # reuses them (the shards and the pools depend on rows, max length and pool sizes too)
    tag = (f"rows{args.rows}-len{args.max_length}-b{args.batch}-ep{args.epochs}-lr{args.lr:g}-gc{args.chunk}"
           f"-sci{args.sci_corpus}-icd{args.icd_queries}x{args.icd_corpus}-d{args.pool_depth}")
    work = Path(args.work) / tag
    work.mkdir(parents=True, exist_ok=True)
    sci_spec = f"beir:{Path(args.scifact).resolve()}"
    sci, icd = load_task(sci_spec), load_task("icd10")
    sci_shards = bm25_shards(work / "shards-scifact", sci_spec, sci.split("train"), expert="scifact", max_rows=args.rows)
    icd_shards = bm25_shards(work / "shards-icd10", "icd10", icd.split("train"), expert="icd10", max_rows=args.rows)
    icd_test = pooled_split(icd.split("test", max_queries=args.icd_queries, seed=13), args.icd_corpus,
                            args.pool_depth, 13)
    sci_test = pooled_split(sci.split("test"), args.sci_corpus, args.pool_depth, 13)
    splits = {"scifact_pooled": sci_test, "icd10_pooled": icd_test}
    smol = smollm2_path()
    decoder = ("model.bidirectional=true", f"train.grad_cache={args.chunk}")

    t_sci = train(work, "smollm2-scifact", "smollm2", sci_shards, args, *decoder)
    t_icd = train(work, "smollm2-icd10", "smollm2", icd_shards, args, *decoder)
    t_mini = train(work, "minilm-scifact", "minilm", sci_shards, args)
    base_dir = prepare_base(ModelConfig(name_or_path="smollm2", bidirectional=True, max_length=args.max_length),
                            work / "smollm2-base-bidirectional")
    merged = work / "smollm2-merged"
    if not (merged / "model.safetensors").is_file():
        merge_models("linear", {t_sci["path"]: 0.5, t_icd["path"]: 0.5}, merged, base=str(base_dir))
    ml = args.max_length
    rows = [score(work, "smollm2 as shipped (causal, EOS)", smol, splits, ml, bidirectional=False)] if args.with_causal else []
    rows += [score(work, "smollm2 bidirectional, untrained", str(base_dir), splits, ml),
            score(work, "smollm2 expert scifact", t_sci["path"], splits, ml),
            score(work, "smollm2 expert icd10", t_icd["path"], splits, ml),
            score(work, "smollm2 merged (linear 0.5/0.5)", str(merged), splits, ml),
            score(work, "minilm base", "minilm", splits, ml),
            score(work, "minilm expert scifact", t_mini["path"], splits, ml)]
    loads = loads_elsewhere(work, str(merged), ml)

    print(f"\nNDCG@10 ({ml} tokens; SciFact {len(sci_test)} test queries in a pool of {len(sci_test.corpus)} "
          f"documents, icd10 {len(icd_test)} in {len(icd_test.corpus)})")
    print(f"{'model':40s} {'SciFact':>8s} {'icd10':>8s}")
    for r in rows:
        print(f"{r['name']:40s} {r['scifact_pooled']:8.4f} {r['icd10_pooled']:8.4f}")
    for t in (t_sci, t_icd, t_mini):
        print(f"train {t['name']}: {t['steps']} steps, {t['samples_per_s']:.2f} samples/s, peak "
              f"{t['peak_memory_gib']:.1f} GiB, {t['wall_s']:.0f} s")
    print(f"merged folder: sentence-transformers max |diff| {loads['sentence_transformers_max_diff']:.2e}; vLLM "
          f"{loads['vllm']}")
    by = {r["name"]: r for r in rows}
    expert, untrained = (by["smollm2 expert scifact"]["scifact_pooled"],
                         by["smollm2 bidirectional, untrained"]["scifact_pooled"])
    vllm_diff = loads["vllm"].get("max_diff", float("inf"))
    claims = [claim("SmolLM2 SciFact expert NDCG@10 minus its untrained bidirectional base", round(expert - untrained, 4),
                    "> 0", expert > untrained),
              claim("merged SmolLM2 in sentence-transformers: max |diff| to our vectors",
                    loads["sentence_transformers_max_diff"], "< 1e-3", loads["sentence_transformers_max_diff"] < 1e-3),
              claim("merged SmolLM2 in vLLM (pooling runner, CPU): max |diff| to our vectors", vllm_diff, "< 1e-2",
                    vllm_diff < 1e-2)]
    for c in claims:
        print(f"claim: {c['name']}: {c['value']} (goal {c['goal']}) -> {'met' if c['met'] else 'NOT met'}")
    out = write_results(__file__, {"rows_per_task": args.rows, "max_length": ml, "epochs": args.epochs, "lr": args.lr,
                                   "grad_cache": args.chunk, "lora": "r=16, alpha=32, all linear layers",
                                   "icd10_test": {"queries": len(icd_test), "corpus": len(icd_test.corpus)},
                                   "scifact_test": {"queries": len(sci_test), "corpus": len(sci_test.corpus)},
                                   "pool_depth": args.pool_depth,
                                   "train": {"smollm2_scifact": t_sci, "smollm2_icd10": t_icd, "minilm_scifact": t_mini},
                                   "ndcg_at_10": rows, "loads": loads}, claims)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
