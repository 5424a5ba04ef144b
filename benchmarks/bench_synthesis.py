"""Synthesis throughput: our Ray Data + vLLM generation stage vs (a) a plain transformers `generate` loop batched
at 16 and (b) raw vLLM `LLM.chat` in a plain process, with vLLM's defaults (its engine core in a second process)
and with the engine core in the same process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`). Same model
(SmolLM2-135M-Instruct), the same STM prompts (icd10 train pairs with a BM25-mined negative), the same sampling
(temperature 0.7, top-p 0.95, max tokens), the same engine arguments.

Generated tokens per second end to end: model/engine start included (for ours also `ray.init`). Each contender
runs in its own process, one after the other. Ours is the stage's generator as the config builds it on this machine
(`synth.vllm_runner=auto`: on a CPU a Ray Data actor holding vllm.LLM); `--only ... ours_processor` adds
ray.data.llm's processor (AsyncLLM). The raw-vLLM claim is against the faster of the two raw vLLM runs. Also prints
two example outputs and the drop counts of the checks.

    python benchmarks/bench_synthesis.py [--prompts 512] [--max-tokens 128]

Writes benchmarks/results/bench_synthesis.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import claim, write_results  # noqa: E402

TEMPERATURE, TOP_P = 0.7, 0.95
LEG_DIR = Path(tempfile.gettempdir())  # each leg's raw result, for --reuse on a later run


def build_prompts(n: int, path: Path) -> None:
    """n STM prompts from icd10 train pairs, each with its top BM25 negative (the mining stage's own code)."""
    from stm_ray.config import load_config
    from stm_ray.data import load_task
    from stm_ray.synth.mine import BM25Index
    from stm_ray.synth.negatives import plan_pairs
    from stm_ray.synth.prompts import negative_messages

    cfg = load_config(None, [f"synth.max_rows={n}"])
    task = load_task("icd10")
    rows = plan_pairs(task, "icd10", cfg)[:n]
    ids = task.corpus.column("_id").to_pylist()
    index = {d: i for i, d in enumerate(ids)}
    texts = task.doc_texts()
    bm25 = BM25Index(texts)
    pos = [[index[r["positive_id"]]] for r in rows]
    judged = [{index[d] for d in r["judged_ids"] if d in index} for r in rows]
    mined = bm25.mine([r["query"] for r in rows], pos, judged, depth=20, count=1)
    out = []
    for r, m in zip(rows, mined.indices):
        neg = texts[m[0]] if m else None
        out.append({"key": r["key"], "query": r["query"], "positive": r["positive"],
                    "instruction": r["instruction"], "negative": neg,
                    "messages": negative_messages(r["query"], r["instruction"], r["positive"], neg)})
    path.write_text(json.dumps(out))


def run_hf(prompts: list[dict], max_tokens: int, batch: int = 16) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stm_ray.modeling.aliases import smollm2_path

    t0 = time.perf_counter()
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.manual_seed(0)
    texts, tokens = [], 0
    for i in range(0, len(prompts), batch):
        chunk = [tok.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True)
                 for p in prompts[i:i + batch]]
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, temperature=TEMPERATURE, top_p=TOP_P,
                                 max_new_tokens=max_tokens, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        gen = out[:, enc["input_ids"].shape[1]:]
        for row in gen:
            n = int((row != (tok.pad_token_id or tok.eos_token_id)).sum())
            tokens += n
            texts.append(tok.decode(row, skip_special_tokens=True))
    return {"seconds": time.perf_counter() - t0, "tokens": tokens, "texts": texts}


def _engine_kwargs() -> dict:
    from stm_ray.config import SynthConfig
    from stm_ray.modeling.aliases import smollm2_path
    from stm_ray.synth.llm import vllm_engine_kwargs

    return vllm_engine_kwargs(SynthConfig(), use_gpu=False, model_dir=smollm2_path())


def run_vllm(prompts: list[dict], max_tokens: int) -> dict:
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams

    from stm_ray.modeling.aliases import smollm2_path

    llm = LLM(model=smollm2_path(), **_engine_kwargs())
    start = time.perf_counter() - t0
    outs = llm.chat([p["messages"] for p in prompts],
                    SamplingParams(temperature=TEMPERATURE, top_p=TOP_P, max_tokens=max_tokens),
                    use_tqdm=False)
    return {"seconds": time.perf_counter() - t0, "engine_start_s": start,
            "tokens": sum(len(o.outputs[0].token_ids) for o in outs), "texts": [o.outputs[0].text for o in outs]}


def run_vllm_one_process(prompts: list[dict], max_tokens: int) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return run_vllm(prompts, max_tokens)


def run_ours_processor(prompts: list[dict], max_tokens: int) -> dict:
    return run_ours(prompts, max_tokens, runner="processor")


def run_ours(prompts: list[dict], max_tokens: int, runner: str = "auto") -> dict:
    t0 = time.perf_counter()
    from stm_ray.ray_setup import init_local_ray

    init_local_ray(num_cpus=os.cpu_count(), log_to_driver=False)
    import ray.data

    from stm_ray.config import SynthConfig
    from stm_ray.modeling.aliases import smollm2_path
    from stm_ray.synth.llm import PASSTHROUGH, build_vllm_processor

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    cfg = SynthConfig(max_new_tokens=max_tokens, temperature=TEMPERATURE, top_p=TOP_P, vllm_runner=runner)
    rows = []
    for _i, p in enumerate(prompts):
        row = {c: "" for c in PASSTHROUGH}
        row.update(kind="negative", key=p["key"], gen=0, shard=0, query=p["query"], positive=p["positive"],
                   instruction=p["instruction"], mined_negatives=[p["negative"]] if p["negative"] else [],
                   mined_sources=[], false_negatives_dropped=0, judged_ids=[], description="", examples=[])
        rows.append(row)
    proc = build_vllm_processor(cfg, smollm2_path(), use_gpu=False)
    blocks = [rows[i:i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
    ds = ray.data.from_items(rows, override_num_blocks=len(blocks))
    out = {r["key"]: r for r in proc(ds).take_all()}
    ordered = [out[p["key"]] for p in prompts]
    return {"seconds": time.perf_counter() - t0, "tokens": sum(r["gen_tokens"] for r in ordered),
            "texts": [r["generated"] for r in ordered]}


def _child(which: str, prompts_path: str, max_tokens: int, result_path: str) -> None:
    prompts = json.loads(Path(prompts_path).read_text())
    fn = {"hf": run_hf, "vllm": run_vllm, "vllm1p": run_vllm_one_process, "ours": run_ours,
          "ours_processor": run_ours_processor}[which]
    Path(result_path).write_text(json.dumps(fn(prompts, max_tokens)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--only", nargs="*", default=["hf", "vllm", "vllm1p", "ours"],
                    choices=["hf", "vllm", "vllm1p", "ours", "ours_processor"],
                    help="contenders to run (default: hf vllm vllm1p ours)")
    ap.add_argument("--reuse", nargs="*", default=[], metavar="LEG=JSON",
                    help="reuse a baseline leg's result (e.g. hf=/tmp/bench_synthesis.hf.json: each leg's JSON is "
                         "saved there; same prompts via --prompts-file, same sampling) instead of running it again: "
                         "transformers takes ~16-22 minutes on 2 cores; the results JSON records every reuse")
    ap.add_argument("--prompts-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.max_tokens, args.child[2])
        return

    from stm_ray.synth.checks import DROP_REASONS, check_negative

    tmp = Path(tempfile.mkdtemp(prefix="bench_synth_"))
    prompts_path = tmp / "prompts.json"
    if args.prompts_file:
        prompts_path.write_text(Path(args.prompts_file).read_text())
    else:
        build_prompts(args.prompts, prompts_path)
    prompts = json.loads(prompts_path.read_text())
    print(f"{len(prompts)} STM prompts from icd10 train pairs; max_tokens={args.max_tokens}, "
          f"temperature={TEMPERATURE}, top_p={TOP_P}", flush=True)
    runs, reused = {}, {}
    for item in args.reuse:
        leg, _, path = item.partition("=")
        if leg not in ("hf", "vllm", "vllm1p") or not path:
            ap.error(f"--reuse {item!r}: expected hf=PATH, vllm=PATH or vllm1p=PATH (baselines only)")
        r = json.loads(Path(path).read_text())
        r["tok_per_s"] = r["tokens"] / r["seconds"]
        runs[leg], reused[leg] = r, {"file": Path(path).name,
                                     "measured": time.strftime("%Y-%m-%dT%H:%M:%S",
                                                               time.localtime(Path(path).stat().st_mtime))}
        print(f"  {leg:5s} {r['tokens']:7d} tokens in {r['seconds']:6.1f} s = {r['tok_per_s']:6.1f} tok/s (reused run)")
    for which in [w for w in args.only if w not in runs]:
        res_path = tmp / f"{which}.json"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--max-tokens", str(args.max_tokens), "--child", which,
                        str(prompts_path), str(res_path)], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = json.loads(res_path.read_text())
        r["tok_per_s"] = r["tokens"] / r["seconds"]
        runs[which] = r
        (LEG_DIR / f"bench_synthesis.{which}.json").write_text(json.dumps(r))
        print(f"  {which:5s} {r['tokens']:7d} tokens in {r['seconds']:6.1f} s = {r['tok_per_s']:6.1f} tok/s "
              f"(process {time.perf_counter() - t:.0f} s)", flush=True)

    names = {"hf": "transformers generate, batch 16", "vllm": "raw vLLM LLM.chat, vLLM defaults",
             "vllm1p": "raw vLLM LLM.chat, engine core in the same process",
             "ours": "stm-ray: Ray Data actor pool, vLLM in the actor's process",
             "ours_processor": "stm-ray with ray.data.llm's vLLM processor (AsyncLLM)"}
    print("\n| contender | tokens | seconds | tok/s |\n|---|---|---|---|")
    for k, r in runs.items():
        print(f"| {names[k]} | {r['tokens']} | {r['seconds']:.1f} | {r['tok_per_s']:.1f} |")
    claims, ratios = [], {}
    if "ours" in runs:
        ours = runs["ours"]
        drops = {k: 0 for k in DROP_REASONS}
        kept = 0
        for p, text in zip(prompts, ours["texts"]):
            _, reason = check_negative(text, p["query"], p["positive"], mined=p["negative"])
            if reason:
                drops[reason] += 1
            else:
                kept += 1
        examples = [{"query": p["query"], "positive": p["positive"], "mined": p["negative"], "generated": t}
                    for p, t in list(zip(prompts, ours["texts"]))[:2]]
        print(f"\nchecks on our {len(prompts)} outputs: kept {kept}, dropped {sum(drops.values())} {drops}")
        for e in examples:
            print(f"\nquery: {e['query']}\npositive: {e['positive']}\nmined: {e['mined']}\ngenerated: {e['generated']}")
        if "hf" in runs:
            ratios["ours_vs_hf"] = ours["tok_per_s"] / runs["hf"]["tok_per_s"]
            claims.append(claim("ours / transformers generate (batch 16) tok/s, end to end",
                                round(ratios["ours_vs_hf"], 3), ">= 3.0", ratios["ours_vs_hf"] >= 3.0))
        raw = [k for k in ("vllm", "vllm1p") if k in runs]
        for k in raw:
            ratios[f"ours_vs_{k}"] = ours["tok_per_s"] / runs[k]["tok_per_s"]
        if "ours_processor" in runs:
            ratios["ours_vs_ours_processor"] = ours["tok_per_s"] / runs["ours_processor"]["tok_per_s"]
        if raw:
            best = max(raw, key=lambda k: runs[k]["tok_per_s"])
            claims.append(claim(f"ours / raw vLLM LLM.chat tok/s, end to end (the faster raw run: {names[best]})",
                                round(ratios[f"ours_vs_{best}"], 3), ">= 0.9", ratios[f"ours_vs_{best}"] >= 0.9))
        print("\n" + "\n".join(f"{c['name']}: {c['value']} (goal {c['goal']}, met: {c['met']})" for c in claims))
        figures = {"prompts": len(prompts), "max_tokens": args.max_tokens, "temperature": TEMPERATURE, "top_p": TOP_P,
                   "engine_kwargs": _engine_kwargs(),
                   "runs": {k: {kk: (round(v, 2) if isinstance(v, float) else v) for kk, v in r.items() if kk != "texts"}
                            for k, r in runs.items()},
                   "ratios": {k: round(v, 3) for k, v in ratios.items()}, "checks": {"kept": kept, "dropped": drops},
                   "reused_runs": reused,
                   "examples": examples}
        print(f"\nwrote {write_results(__file__, figures, claims)}")


if __name__ == "__main__":
    main()
