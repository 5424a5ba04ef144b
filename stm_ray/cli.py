"""The ``stm-ray`` command line. Every command calls a library function; see ``stm-ray COMMAND --help``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from stm_ray import __version__
from stm_ray.storage import run_path

EPILOG = """\
Config files are YAML with one section per stage (data, model, synth, train, search, merge, eval, rerank, serve);
any field can be overridden on the command line as a dotted key=value, e.g. train.lora.r=32 model.max_length=256.
Task specs: icd10 (embedded ICD-10-CM clinical coding; icd10:1,2 = chapters 1 and 2), beir:DIR (a BEIR folder),
mteb:TaskName (downloaded by mteb; needs the Hugging Face hub), docs:SOURCE (documents only; the queries stage
writes synthetic queries: SOURCE is a .jsonl / .parquet file with id + text (+ title), a folder of .txt / .md
files, a folder with corpus.jsonl, or a task spec whose corpus is used, e.g. docs:icd10:9,10).
Model aliases that work offline: minilm (all-MiniLM-L6-v2), smollm2 (SmolLM2-135M-Instruct).
"""


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lora.r=32")


def _stage_parser(sub, command: str) -> argparse.ArgumentParser:
    """A stage's subcommand, with the help the stage registry (stm_ray/stages.py) gives it."""
    from stm_ray.stages import BY_COMMAND

    st = BY_COMMAND[command]
    return sub.add_parser(command, help=st.help, description=f"{st.description}\n\nstage {st.name!r}: writes "
                          f"{', '.join(st.writes)} in the run directory; library function {st.function}",
                          formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)


def build_parser() -> argparse.ArgumentParser:
    from stm_ray.stages import help_lines

    parser = argparse.ArgumentParser(
        prog="stm-ray", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Synthesize-Train-Merge domain retrievers on Ray: synthesize hard negatives, train LoRA experts, "
                    "search and merge them, evaluate and serve.")
    parser.add_argument("--version", action="version", version=f"stm-ray {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("STM_RAY_LOG_LEVEL", "INFO"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level (default INFO)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        default=os.environ.get("STM_RAY_VERBOSE", "") not in ("", "0"),
                        help="also show Ray's, vLLM's, DeepSpeed's and transformers' output on the console (by default "
                             "it goes only to the log file, <run_dir>/logs/, whose last lines an error prints)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="the whole loop on the embedded default, offline on a CPU (~10 min on 2 cores)",
                       description="The offline demo: the whole Synthesize-Train-Merge loop (stm-ray run) on the "
                                   "embedded default, with the built-in config stm_ray/configs/demo.yaml. Two clinical "
                                   "areas of ICD-10-CM (chapters 1-6 and 9-12) are two tasks: area A with its real "
                                   "queries, area B with its code descriptions only (docs:icd10:9,10,11,12), for which "
                                   "SmolLM2 writes queries that are filtered by a round trip through MiniLM (stage "
                                   "queries); Synthesize mines BM25 and "
                                   "dense negatives and has SmolLM2-135M-Instruct (vLLM) write some more; one LoRA expert "
                                   "of all-MiniLM-L6-v2 is trained per area (Ray Train, side by side); Ray Tune searches "
                                   "the query instruction and the mergekit merge; base, each expert and the merged model "
                                   "are evaluated on the test split. Prints NDCG@10 per area and mean, and writes "
                                   "<run_dir>/report.md with plots. Resumable: a rerun continues where it stopped, and a "
                                   "finished run only prints its table.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("--config", help="pipeline config YAML (default: the built-in demo config)")
    p.add_argument("--run-dir", default=None, help="run directory (default: runs/demo)")
    p.add_argument("--force", action="store_true", help="redo every stage's outputs even when their fingerprints match")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    _add_overrides(p)

    p = sub.add_parser("report", help="(re)write <run_dir>/report.md with plots from a run's files",
                       description="Write <run_dir>/report.md and its PNG plots (<run_dir>/report/): NDCG@10 per task "
                                   "for base / experts / merged, the merge-search trials (each expert's coefficient vs "
                                   "dev score), synthesis and training throughput, and the stage table. Reads only the "
                                   "run's files (manifest.json, eval/, merged/merge.json, experts/, synth/), so it works "
                                   "on a finished or a partial run; stm-ray run and stm-ray demo write it at the end.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory of stm-ray run / stm-ray demo")

    p = sub.add_parser("run", help="the whole loop: (queries,) synthesize, train, instructions, merge, evaluate (, rerank, serve)",
                       description="Run the Synthesize-Train-Merge loop over one run directory: with docs: tasks, "
                                   "write and filter synthetic queries for them first (stage 'queries', see stm-ray "
                                   "queries --help) -> synthesize (Ray Data + "
                                   "vLLM) -> with teacher.kind set, teacher scores for every row (stage 'teacher', "
                                   "see stm-ray teacher --help; train.distill learns them) -> train one LoRA expert "
                                   "per source (Ray Train) -> instruction search and "
                                   "merge search (Ray Tune + mergekit) -> evaluate base, every expert and the merged "
                                   "model on the test split -> with rerank.rerankers set, train those rerankers "
                                   "(stage 'rerankers', after synthesize) and rerank the merged model's top rerank.top_k "
                                   "on the test split (stage 'rerank', last) -> optionally serve (--serve). Every "
                                   "output carries the "
                                   "fingerprint of what produced it (the config fields that change it and its inputs' "
                                   "fingerprints): a rerun reuses an output whose fingerprint matches, redoes one whose "
                                   "fingerprint differs (the log names the fields that changed) and resumes an "
                                   "unfinished one, so rerunning a finished run does nothing and changing "
                                   "train.learning_rate redoes training, merge and evaluation but not synthesis. "
                                   "<run_dir>/manifest.json records the config, package versions and per stage its "
                                   "status, fingerprint, what the rule decided, timings and counts. run_dir may be "
                                   "s3://BUCKET/PATH or gs://... (AWS_ENDPOINT_URL for an S3-compatible server), used "
                                   "directly with a cache per node and a lock per run: no shared disk needed. On a Ray "
                                   "cluster submit jobs/pipeline.py instead (same arguments).\n\nStages, in order "
                                   "(--stages / --skip take these names):\n" + help_lines(),
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("config", nargs="?", help="pipeline config YAML (omit for the defaults)")
    p.add_argument("--stages", default=None, help="comma-separated subset, e.g. train,merge (default: all but serve)")
    p.add_argument("--skip", default=None, help="comma-separated stages to leave out, e.g. instructions")
    p.add_argument("--force", action="store_true", help="redo the chosen stages' outputs even when their fingerprints "
                                                        "match")
    p.add_argument("--serve", action="store_true", help="deploy the merged model on Ray Serve at the end and block")
    p.add_argument("--corpus", default=None, metavar="TASK", help="with --serve: index this task's corpus for /search")
    p.add_argument("--no-block", action="store_true", help="with --serve: return once the application is up (on a "
                                                          "cluster it keeps running)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    _add_overrides(p)

    p = _stage_parser(sub, "evaluate")
    p.add_argument("--model", default=None, help="alias, folder or hub id (default: model.name_or_path of the config)")
    p.add_argument("--task", action="append", default=None,
                   help="task spec; repeat for several (default: data.tasks of the config)")
    p.add_argument("--split", default=None, help="split to evaluate (default: data.test_split, 'test')")
    p.add_argument("--output", default=None, help="JSON file (one task) or folder (several) for mteb-format results")
    p.add_argument("--max-queries", type=int, default=None, help="deterministic subsample of queries")
    p.add_argument("--mteb", action="store_true", help="also run mteb.evaluate on the same model and data and compare")
    p.add_argument("--rerank", action="append", default=None, metavar="RERANKER",
                   help="also rerank the model's top rerank.top_k (default 100) with this reranker folder (a "
                        "cross-encoder or an LLM reranker, ours or sentence-transformers'); repeat for several. "
                        "Prints the retriever alone and + each reranker")
    p.add_argument("--strict", action="store_true", help="make data problems fatal (qrels naming unknown ids)")
    p.add_argument("--config", help="pipeline config YAML")
    _add_overrides(p)

    p = _stage_parser(sub, "synthesize")
    p.add_argument("config", nargs="?", help="pipeline config YAML (omit for the defaults)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    _add_overrides(p)

    p = _stage_parser(sub, "queries")
    p.add_argument("config", nargs="?", help="pipeline config YAML (omit for the defaults)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    _add_overrides(p)

    p = _stage_parser(sub, "teacher")
    p.add_argument("config", nargs="?", help="pipeline config YAML (omit for the defaults)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    _add_overrides(p)

    p = _stage_parser(sub, "train")
    p.add_argument("config", nargs="?", help="pipeline config YAML (omit for the defaults)")
    p.add_argument("--shards", default=None, help="shard folder or parquet file (default: <run_dir>/teacher with teacher.kind, else "
                                                "train.shards or <run_dir>/synth)")
    p.add_argument("--expert", action="append", default=None, help="train only this expert; repeat for several")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    _add_overrides(p)

    p = _stage_parser(sub, "train-reranker")
    p.add_argument("config", nargs="?", help="pipeline config YAML (omit for the defaults)")
    p.add_argument("--kind", action="append", choices=["cross-encoder", "llm"], default=None,
                   help="train this preset (adds it to rerank.rerankers when missing); repeat for both")
    p.add_argument("--shards", default=None, help="shard folder or parquet file (default: <run_dir>/teacher with teacher.kind, else "
                                                "train.shards or <run_dir>/synth)")
    p.add_argument("--only", action="append", default=None, metavar="NAME", help="train only this reranker")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    _add_overrides(p)

    p = _stage_parser(sub, "tune-prompts")
    p.add_argument("config", nargs="?", help="pipeline config YAML (omit for the defaults)")
    p.add_argument("--model", default=None, help="model to tune (default: <run_dir>/merged if present, else the base)")
    p.add_argument("--train", action="store_true", help="training mode: one expert per size in search.pool_sizes")
    p.add_argument("--shards", default=None, help="--train: shard folder (default: train.shards or <run_dir>/synth)")
    p.add_argument("--no-save", action="store_true", help="do not write the winner into the model folder")
    p.add_argument("--no-progress", action="store_true", help="no Tune progress tables (logs only)")
    _add_overrides(p)

    p = _stage_parser(sub, "merge")
    p.add_argument("config", nargs="?", help="pipeline config YAML (omit for the defaults)")
    p.add_argument("--no-progress", action="store_true", help="no Tune progress tables (logs only)")
    _add_overrides(p)

    p = _stage_parser(sub, "serve")
    p.add_argument("target", metavar="RUN_DIR_OR_MODEL", help="run directory (serves merged/), model folder or alias")
    p.add_argument("--config", help="pipeline config YAML (default: <RUN_DIR>/config.yaml when present, else defaults)")
    p.add_argument("--corpus", default=None, metavar="TASK", help="task spec whose corpus /search covers, e.g. icd10")
    p.add_argument("--host", default=None, help="bind address (default serve.host = 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default serve.port = 8000)")
    p.add_argument("--reranker", default=None, metavar="FOLDER", help="also serve this reranker at /v1/rerank (Cohere/"
                   "Jina shape) and for /search with \"rerank\": true (stm-ray train-reranker's folders, or a "
                   "sentence-transformers cross-encoder)")
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local one)")
    p.add_argument("--write-config", default=None, metavar="FILE", help="write a Serve config YAML and exit")
    p.add_argument("--no-block", action="store_true", help="return once the application is up; with --address it "
                                                          "keeps running on that cluster (a local Ray started here "
                                                          "stops with this command)")
    _add_overrides(p)

    p = sub.add_parser("config", help="show or write the resolved configuration")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    cs = csub.add_parser("show", help="print the resolved config (defaults + file + overrides) as YAML")
    cs.add_argument("config", nargs="?", help="config YAML (omit for the defaults)")
    _add_overrides(cs)

    p = sub.add_parser("data", help="inspect and validate tasks")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    di = dsub.add_parser("inspect", help="load a task, validate it and print its size per split",
                         description="Load a task spec, report every problem (file, line, field) and print counts.")
    di.add_argument("task", help="task spec, e.g. icd10 or beir:path/to/scifact")
    di.add_argument("--strict", action="store_true", help="fail on the first problem")
    return parser


def _split_config_arg(args) -> None:
    """`stm-ray config show a=b` has no file: move key=value tokens from the positional config to overrides."""
    if getattr(args, "config", None) and "=" in args.config and not Path(args.config).exists():
        args.overrides = [args.config, *args.overrides]
        args.config = None


def cmd_config(args) -> int:
    from stm_ray.config import load_config

    _split_config_arg(args)
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(cfg.to_yaml())
    return 0


def cmd_data(args) -> int:
    from stm_ray.data import load_task

    t = load_task(args.task, strict=args.strict)
    print(f"task {t.name}: {t.description}")
    for k, v in t.summary().items():
        print(f"  {k:>14}: {v:,}")
    extra = [c for c in t.corpus.column_names if c not in ("_id", "title", "text")]
    if extra:
        print(f"  extra columns: {', '.join(extra)}")
    if t.report.problems:
        print(f"  problems: {len(t.report.problems)} rows skipped {t.report.counts()}")
        for p in t.report.problems[:20]:
            print(f"    {p}")
    else:
        print("  problems: none")
    return 0


def cmd_evaluate(args) -> int:
    from stm_ray.config import load_config
    from stm_ray.eval import evaluate_tasks, results_table

    cfg = load_config(args.config, args.overrides)
    _hold_run_dir(cfg.run_dir)
    if args.rerank:
        return _evaluate_reranked(cfg, args)
    results = evaluate_tasks(cfg, model=args.model, tasks=args.task, split=args.split, output=args.output,
                             max_queries=args.max_queries, use_mteb=args.mteb or None, strict=args.strict or None)
    print(f"\nmodel: {args.model or cfg.model.name_or_path}")
    print(results_table(results))
    return 0


def _evaluate_reranked(cfg, args) -> int:
    from stm_ray.eval.evaluate import result_path
    from stm_ray.rerank.evaluate import rerank_task
    from stm_ray.tables import format_table

    model = args.model or cfg.model.name_or_path
    data = cfg.data.model_copy(update={"test_split": args.split or cfg.data.test_split,
                                       "strict": args.strict or cfg.data.strict})
    rerank = cfg.rerank.model_copy(update={"max_queries": args.max_queries or cfg.rerank.max_queries})
    cfg = cfg.model_copy(update={"data": data, "rerank": rerank})
    tasks = args.task or cfg.data.tasks
    names = {f"{i}:{Path(r).name}" if len(args.rerank) > 1 else Path(r).name: r for i, r in enumerate(args.rerank)}
    rows = []
    for task in tasks:
        outputs = ({n: result_path(Path(args.output) / f"rerank-{n.replace(':', '_')}", task) for n in names}
                   if args.output else None)
        res = rerank_task(cfg, model, names, task, outputs=outputs)
        rows.append({"task": task, "retriever": res["retriever"]["scores"]["ndcg_at_10"],
                     **{f"+ {n}": res[n]["scores"]["ndcg_at_10"] for n in names},
                     **{f"s/query {n}": res[n]["seconds_per_query"] for n in names}})
    print(f"\nretriever: {model}; top {cfg.rerank.top_k} reranked; NDCG@10 on the {cfg.data.test_split} split")
    print(format_table(rows, list(rows[0])))
    return 0


def cmd_train_reranker(args) -> int:
    from stm_ray.config import RERANKER_PRESETS, load_config
    from stm_ray.rerank.train import summary_table, train_rerankers

    _split_config_arg(args)
    cfg = load_config(args.config, args.overrides)
    _hold_run_dir(cfg.run_dir)
    if args.kind:
        have = [r.model_dump(mode="json") for r in cfg.rerank.rerankers]
        add = [RERANKER_PRESETS[k] for k in args.kind if k not in {r["name"] for r in have}]
        cfg = load_config(args.config, [*args.overrides, f"rerank.rerankers={json.dumps(have + add)}"])
        args.only = list(dict.fromkeys((args.only or []) + list(args.kind)))
    t0 = time.perf_counter()
    results = train_rerankers(cfg, shards=args.shards, only=args.only, show_progress=not args.no_progress)
    print("\n" + summary_table(results))
    print(f"\n{len(results)} reranker(s) in {run_path(cfg.run_dir) / 'rerankers'} ({time.perf_counter() - t0:.0f} s); "
          "each loads with sentence_transformers.CrossEncoder(path)")
    return 0


def cmd_synthesize(args) -> int:
    from stm_ray.config import load_config
    from stm_ray.synth import synthesize
    from stm_ray.synth.negatives import summary_table

    _split_config_arg(args)
    cfg = load_config(args.config, args.overrides)
    _hold_run_dir(cfg.run_dir)
    result = synthesize(cfg, show_progress=not args.no_progress)
    print("\n" + summary_table(result))
    return 0


def cmd_queries(args) -> int:
    from stm_ray.config import ConfigError, load_config
    from stm_ray.synth.queries import docs_tasks, summary_table, synthesize_queries

    _split_config_arg(args)
    cfg = load_config(args.config, args.overrides)
    _hold_run_dir(cfg.run_dir)
    if not docs_tasks(cfg):
        raise ConfigError("data.tasks has no docs: task (e.g. data.tasks=[docs:path/to/corpus.jsonl])")
    counts = synthesize_queries(cfg, show_progress=not args.no_progress)
    print("\n" + summary_table(counts))
    print(f"\nsynthetic tasks in {run_path(cfg.run_dir) / 'queries'} ({counts['seconds']:.0f} s)")
    return 0


def cmd_teacher(args) -> int:
    from stm_ray.config import load_config
    from stm_ray.teacher.scores import teacher_scores

    _split_config_arg(args)
    cfg = load_config(args.config, args.overrides)
    _hold_run_dir(cfg.run_dir)
    c = teacher_scores(cfg, show_progress=not args.no_progress)
    print(f"\nteacher {c['kind']}: {c['rows_scored']} of {c['rows']} rows scored ({c['pairs']} pairs, "
          f"{c['pairs_failed']} failed, {c['pairs_per_s'] or '-'} pairs/s) -> {run_path(cfg.run_dir) / 'teacher'} "
          f"({c['seconds']:.0f} s)")
    return 0


def cmd_train(args) -> int:
    from stm_ray.config import load_config
    from stm_ray.train import summary_table, train_experts

    _split_config_arg(args)
    cfg = load_config(args.config, args.overrides)
    _hold_run_dir(cfg.run_dir)
    t0 = time.perf_counter()
    results = train_experts(cfg, shards=args.shards, only=args.expert, show_progress=not args.no_progress)
    summary = json.loads((run_path(cfg.run_dir) / "experts" / "summary.json").read_text())
    print("\n" + summary_table(results, (summary.get("base") or {}).get("dev_ndcg_at_10")))
    print(f"\n{len(results)} expert(s) in {run_path(cfg.run_dir) / 'experts'} ({time.perf_counter() - t0:.0f} s); "
          f"resumed: {sum(1 for r in results if r.resumed_from)}, already done: {sum(1 for r in results if r.skipped)}")
    return 0


def cmd_tune_prompts(args) -> int:
    from stm_ray.config import load_config
    from stm_ray.tables import format_table
    from stm_ray.tune import instruction_table, search_instructions, search_pool_size

    _split_config_arg(args)
    cfg = load_config(args.config, args.overrides)
    _hold_run_dir(cfg.run_dir)
    if args.train:
        out = search_pool_size(cfg, shards=args.shards, show_progress=not args.no_progress)
        rows = [{"pool size": r["pool_size"], "dev NDCG@10": r["ndcg_at_10"], "Recall@10": r["recall_at_10"]}
                for r in out["trials"] if "error" not in r]
        print("\n" + format_table(rows, ["pool size", "dev NDCG@10", "Recall@10"]))
        print(f"\nbest pool size: {out['best']['pool_size']} -> {run_path(cfg.run_dir) / 'search' / 'instruction_pools.json'}")
        return 0
    res = search_instructions(cfg, model=args.model, save=not args.no_save, show_progress=not args.no_progress)
    print("\n" + instruction_table(res))
    print(f"\nbest instruction: {res.instruction!r} (dev NDCG@10 {res.dev['ndcg_at_10']:.4f}; no instruction "
          f"{res.baseline.get('ndcg_at_10', float('nan')):.4f})")
    print(f"saved: {res.saved_to or 'not in the model folder (not a folder of this run)'}; "
          f"results: {run_path(cfg.run_dir) / 'search' / 'instructions.json'}")
    return 0


def cmd_merge(args) -> int:
    from stm_ray.config import load_config
    from stm_ray.merge import merge_table, search_merge

    _split_config_arg(args)
    cfg = load_config(args.config, args.overrides)
    _hold_run_dir(cfg.run_dir)
    res = search_merge(cfg, show_progress=not args.no_progress)
    print("\nmean dev NDCG@10 (Recall@10 breaks ties):")
    print(merge_table(res))
    name, single = res.best_single
    print(f"\nmerged - best single expert ({name}): {res.dev['ndcg_at_10'] - single:+.4f}; "
          f"{len(res.trials)} trials{' (already done)' if res.skipped else ''}")
    print(f"merged model: {res.path}   (SentenceTransformer('{res.path}') loads it)")
    return 0


_SESSIONS = contextlib.ExitStack()


def _hold_run_dir(run_dir: str) -> None:
    """A command that works on a run directory holds it for its duration (:class:`stm_ray.storage.RunSession`:
    the run's lock; for s3:// / gs://, its working copy fetched now and put back as it is written). ``main``
    releases it."""
    from stm_ray.storage import RunSession

    _SESSIONS.enter_context(RunSession(run_dir))


def _stage_list(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def cmd_run(args) -> int:
    from stm_ray.config import load_config
    from stm_ray.pipeline import run_pipeline
    from stm_ray.report import pipeline_table

    _split_config_arg(args)
    cfg = load_config(args.config, args.overrides)
    manifest = run_pipeline(cfg, stages=_stage_list(args.stages), skip=_stage_list(args.skip), serve=args.serve,
                            corpus=args.corpus, force=args.force, show_progress=not args.no_progress)
    print("\n" + pipeline_table(manifest))
    print(f"\nmanifest: {manifest['run_dir'].rstrip('/')}/manifest.json   report: "
          f"{manifest['run_dir'].rstrip('/')}/report.md")
    if args.serve and not args.no_block:
        serve_info = manifest["stages"]["serve"].get("counts") or {}
        print(f"serving at {serve_info.get('url')} - Ctrl-C stops")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def demo_config_path() -> Path:
    from importlib.resources import files

    return Path(str(files("stm_ray") / "configs" / "demo.yaml"))


def print_summary(run_dir: str | Path, report: Path | None) -> None:
    """The headline table (NDCG@10 per task and mean, one column per model) and where the report is."""
    from stm_ray.records import read_record
    from stm_ray.report import ndcg_table, summary_rows
    from stm_ray.tables import format_table

    manifest = read_record(Path(run_dir) / "manifest.json", kind="run manifest") or {}
    queries = ((manifest.get("stages") or {}).get("queries") or {}).get("counts") or {}
    if queries.get("tasks"):
        from stm_ray.synth.queries import summary_table

        print("\nsynthetic queries (docs: tasks):")
        print(summary_table(queries))
    tasks, table, split = ndcg_table(Path(run_dir))
    if table and tasks:
        header, rows = summary_rows(tasks, table, Path(run_dir))
        print(f"\nNDCG@10 on the {split} split:")
        print(format_table([dict(zip(header, r)) for r in rows], header))
    from stm_ray.report import rerank_rows

    rr = rerank_rows(Path(run_dir))
    if rr:
        header, rows, info = rr
        print(f"\nreranking the {info['retriever']} retriever's top {info['top_k']} (NDCG@10, {info['split']} split):")
        print(format_table([dict(zip(header, r)) for r in rows], header))
    if report is not None:
        print(f"\nreport: {report}   (plots in {report.parent / 'report'})")


def cmd_demo(args) -> int:
    from stm_ray.config import load_config
    from stm_ray.pipeline import run_pipeline
    from stm_ray.report import pipeline_table

    overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    cfg = load_config(args.config or str(demo_config_path()), overrides)
    t0 = time.perf_counter()
    manifest = run_pipeline(cfg, force=args.force, show_progress=not args.no_progress)
    print("\n" + pipeline_table(manifest, ndcg=False))  # the per-area table follows
    print_summary(run_path(cfg.run_dir), run_path(cfg.run_dir) / "report.md")
    print(f"manifest: {run_path(cfg.run_dir) / 'manifest.json'}; this invocation took {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_report(args) -> int:
    from stm_ray.report import write_report
    from stm_ray.storage import is_remote

    if is_remote(args.run_dir):
        _hold_run_dir(args.run_dir)
    path = write_report(run_path(args.run_dir))
    print_summary(run_path(args.run_dir), path)
    return 0


def cmd_serve(args) -> int:
    if args.address:
        from stm_ray.ray_setup import join_cluster_env

        join_cluster_env(args.address)
    from stm_ray.config import load_config
    from stm_ray.serve.deploy import (
        app_args,
        example_curl,
        index_folder,
        resolve_target,
        serve_config_yaml,
        start,
    )
    from stm_ray.storage import RunStore, is_remote
    from stm_ray.utils import atomic_write_text

    config = args.config
    if config is None and is_remote(args.target) and RunStore(args.target).read_json("manifest.json"):
        config = str(RunStore(args.target).fetch("config.yaml"))  # the run's own settings, as for a folder
    elif config is None and (Path(args.target) / "config.yaml").is_file():
        config = str(Path(args.target) / "config.yaml")
    overrides = list(args.overrides)
    if args.host:
        overrides.append(f"serve.host={args.host}")
    if args.port:
        overrides.append(f"serve.port={args.port}")
    if args.reranker:
        overrides.append(f"serve.reranker={args.reranker}")
    cfg = load_config(config, overrides)
    if args.write_config:
        model, run_dir = resolve_target(args.target)
        folder = index_folder(cfg, args.corpus, run_dir) if args.corpus else None
        atomic_write_text(args.write_config, serve_config_yaml(cfg, app_args(cfg, model, folder, args.log_level)))
        note = f" (build the index first: stm-ray serve {args.target} --corpus {args.corpus})" if folder and not (
            folder / "meta.json").is_file() else ""
        print(f"Serve config written to {args.write_config}{note}\n  serve run {args.write_config}")
        return 0
    info = start(cfg, args.target, args.corpus, log_level=args.log_level, address=args.address)
    url = info["url"]
    if info["index"]:
        print(f"\nindexed {info['index'].get('num_documents')} documents of {args.corpus} "
              f"({'reused' if info['index'].get('reused') else 'built'}): {info['args']['index_dir']}")
    print(f"\nstm-ray retriever {info['args']['model_name']!r} is up at {url}   (docs: {url}/docs)")
    ing = info["ingress"]
    print("the replica answers HTTP itself (direct ingress); Serve's proxy is a fallback on port "
          f"{ing['proxy_port']}" if ing["mode"] == "direct" else "Serve's HTTP proxy routes to the replicas")
    if cfg.serve.token_env:
        print(f"requests need 'Authorization: Bearer ${cfg.serve.token_env}'")
    print("\n" + example_curl(cfg, with_search=bool(args.corpus)) + "\n")
    if cfg.serve.reranker:
        print(f"reranker {cfg.serve.reranker}: POST {url}/v1/rerank {{\"query\": ..., \"documents\": [...], "
              f"\"top_n\": 3}} (Cohere's client: cohere.ClientV2(base_url='{url}', api_key=...).rerank(...))\n")
    print(f"OpenAI client: OpenAI(base_url='{url}/v1', api_key=...).embeddings.create(model="
          f"'{info['args']['model_name']}', input=[...])")
    if args.no_block:
        return 0
    from ray import serve

    print("Ctrl-C stops it.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nshutting down", flush=True)
        serve.shutdown()
    return 0


COMMANDS = {"serve": cmd_serve, "config": cmd_config, "data": cmd_data, "evaluate": cmd_evaluate, "demo": cmd_demo, "report": cmd_report, "train": cmd_train,
            "synthesize": cmd_synthesize, "queries": cmd_queries, "teacher": cmd_teacher, "train-reranker": cmd_train_reranker, "tune-prompts": cmd_tune_prompts, "merge": cmd_merge, "run": cmd_run}


def _interrupted(command: str) -> int:
    import signal

    signal.signal(signal.SIGINT, lambda *_: os._exit(130))  # a second Ctrl-C aborts at once
    print(f"\nstm-ray {command}: interrupted (Ctrl-C again aborts at once). What was written is kept; the same "
          "command again resumes from it.", file=sys.stderr, flush=True)
    return 130


def main(argv: list[str] | None = None) -> int:
    from stm_ray import console
    from stm_ray.config import ConfigError
    from stm_ray.data import DataError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options too (`run cfg.yaml --stages train train.epochs=2`)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    console.configure(args.command, verbose=args.verbose, level=args.log_level)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C stops the command, not one Tune trial
    from stm_ray.storage import StoreError

    try:
        with _SESSIONS:
            return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return _interrupted(args.command)
    except (ConfigError, DataError, FileNotFoundError, StoreError) as e:
        where = ""
        if isinstance(e, FileNotFoundError) and not e.filename and e.__traceback__ is not None:
            import traceback

            frame = traceback.extract_tb(e.__traceback__)[-1]  # an OS error without a path: say where it came from
            where = f" (in {Path(frame.filename).name}:{frame.lineno} {frame.name})"
        print(f"stm-ray {args.command}: error: {e}{where}", file=sys.stderr)
        return 2
    except Exception as e:
        if console.verbose():
            raise
        logging.getLogger("stm_ray.cli").debug("%s failed", args.command, exc_info=True)
        lines = console.tail(30)
        print("\n".join(["", f"--- last lines of {console.log_file()} ---", *lines, "---"]), file=sys.stderr)
        print(f"stm-ray {args.command}: error: {type(e).__name__}: {e}\n(the whole log, with the traceback: "
              f"{console.log_file()}; --verbose shows everything on the console)", file=sys.stderr)
        return 1
    finally:
        console.reset()


if __name__ == "__main__":
    raise SystemExit(main())
