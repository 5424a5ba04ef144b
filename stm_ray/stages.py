"""The stage registry: every stage of the loop, in loop order, in one place.

For each stage: its name, the library function that does the work (the pipeline, its CLI command, jobs/ and Tune
trainables only call it), what it reads and writes in the run directory, when ``stm-ray run`` runs it, and its CLI
subcommand with that command's help. ``stm_ray.pipeline`` takes its order and its "does it run" rule from here,
``stm_ray.cli`` its stage commands' help, and a test checks the README's stage table against :func:`markdown_table`.
How a stage decides to reuse, redo or resume its outputs is the stage contract (:mod:`stm_ray.stage`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any


# What a stage needs from the config to run (None: it runs); stm-ray run leaves it out otherwise, and asking for it
# by name is an error: "stage 'NAME' needs <this>".
def _has_docs(cfg) -> str | None:
    if any(t.startswith("docs:") for t in cfg.data.tasks):
        return None
    return "a docs: task in data.tasks, e.g. data.tasks=[docs:path/to/corpus.jsonl]"


def _has_rerankers(cfg) -> str | None:
    return None if cfg.rerank.rerankers else "rerank.rerankers, e.g. rerank.rerankers=[cross-encoder,llm]"


def _has_teacher(cfg) -> str | None:
    return None if cfg.teacher.kind is not None else (
        "teacher.kind, e.g. teacher.kind=reranker teacher.reranker=cross-encoder (with "
        "rerank.rerankers=[cross-encoder]) or teacher.kind=llm")


def _never(cfg) -> str | None:
    return "--serve (it runs only when asked)"


@dataclass(frozen=True)
class Stage:
    """One stage of the loop."""

    name: str
    function: str  # "module:function", the library function that does the stage's work
    command: str | None  # its stm-ray subcommand (None: only inside stm-ray run / another command)
    reads: tuple[str, ...]
    writes: tuple[str, ...]  # in the run directory
    runs_when: str  # in words, for --help and the README
    help: str  # the subcommand's one-line help
    description: str  # the subcommand's --help text
    needs: Callable[[Any], str | None] | None = None  # what the config lacks for it to run (None: nothing)

    def load(self) -> Callable[..., Any]:
        module, _, name = self.function.partition(":")
        return getattr(import_module(module), name)

    def missing(self, cfg) -> str | None:
        """What ``cfg`` lacks for this stage to run (None when it runs)."""
        return None if self.needs is None else self.needs(cfg)


STAGES: tuple[Stage, ...] = (
    Stage(
        name='queries', function='stm_ray.synth.queries:synthesize_queries', command='queries',
        reads=('data.tasks (docs: tasks)',), writes=('queries/<docs-name>/',),
        runs_when='data.tasks has a docs: task', needs=_has_docs,
        help=("write synthetic queries for docs: tasks (Ray Data + vLLM), filtered"),
        description=("For every docs:SOURCE task of data.tasks (a corpus without queries): sample "
                     "queries.max_documents documents and have the generator LLM (synth.generator, vLLM "
                     "actors through ray.data.llm, or synth.engine=openai) write queries.per_document "
                     "queries each, of the kinds in queries.kinds in turn (keyword, question, lay, "
                     "reasoning; templates in queries.prompts, few-shot queries.examples). Filters, each "
                     "drop counted by reason: lexical (empty, refusal, boilerplate, too short / long, "
                     "copy of the document, duplicate), round trip (the base retriever must put the "
                     "source document in its top queries.round_trip_k), a reranker score "
                     "(queries.reranker; skipped without one), optionally too-easy ones "
                     "(queries.drop_easy). The documents with kept queries are split into train / dev / "
                     "test (disjoint; with queries.real_test a docs:icd10 or docs:beir:DIR source's real "
                     "test split is the test split). Writes <run_dir>/queries/<docs-name>/ (a BEIR folder"
                     " every later stage reads for that task, raw/ generations with their drop reasons, "
                     "manifest.json). Resumable (raw shards); a changed filter setting refilters without "
                     "generating again. The same stage runs first in stm-ray run.")),
    Stage(
        name='synthesize', function='stm_ray.synth:synthesize', command='synthesize',
        reads=('data.tasks', 'queries/'), writes=('synth/',),
        runs_when='always', needs=None,
        help=("mine hard negatives and write new ones with an LLM (Ray Data + vLLM)"),
        description=("For every (query, positive) pair of the train split of data.tasks: mine hard "
                     "negatives (BM25 and dense, positive-aware false-negative filter), then have the "
                     "generator LLM (synth.generator, default SmolLM2-135M-Instruct on vLLM; or any "
                     "OpenAI-compatible endpoint with synth.engine=openai synth.base_url=URL and the key "
                     "in $OPENAI_API_KEY) write synth.synthetic_per_query new hard negatives through "
                     "ray.data.llm. Each generated negative is checked (empty, too short, copy of the "
                     "positive or query, refusal, chat boilerplate); failures are dropped and counted. "
                     "Writes <run_dir>/synth/<task>/part-*.parquet (the shards `stm-ray train` reads) and"
                     " <run_dir>/synth/instructions/<task>.json (an instruction pool). A rerun under the "
                     "same fingerprint writes only the missing shards; under another one (a changed synth"
                     " or data field, other task data) it redoes them. Joins the cluster in RAY_ADDRESS, "
                     "else starts a local Ray on 127.0.0.1.")),
    Stage(
        name='rerankers', function='stm_ray.rerank.train:train_rerankers', command='train-reranker',
        reads=('synth/',), writes=('rerankers/<name>/',),
        runs_when='rerank.rerankers is set', needs=_has_rerankers,
        help=("train the rerankers of rerank.rerankers (Ray Train), in parallel"),
        description=("Train rerankers from the synthesized shards (train.shards, default "
                     "<run_dir>/synth): each query's positive against its hard negatives (mined and "
                     "LLM-written), softmax over the group or pointwise BCE (rerank.loss). Kinds: "
                     "'cross-encoder' (an encoder with a one-logit head, default all-MiniLM-L6-v2, full "
                     "fine-tune) and 'llm' (LimRank's pointwise LLM reranker: a decoder with LoRA, "
                     "default SmolLM2-135M-Instruct, asked whether the document is relevant; score = "
                     "p(yes) / (p(yes) + p(no))). Each is a Ray Train run (rerank.num_workers workers, "
                     "DDP or DeepSpeed with rerank.strategy=deepspeed), with checkpoints and resume, all "
                     "at once as far as the cluster allows. Writes <run_dir>/rerankers/<name>/: a Hugging"
                     " Face folder that sentence_transformers.CrossEncoder(path) loads (both kinds), plus"
                     " metrics.json and loss.png. Stage contract as everywhere: a rerun reuses a reranker"
                     " whose fingerprint matches. Example: stm-ray train-reranker cfg.yaml "
                     "'rerank.rerankers=[cross-encoder,llm]'")),
    Stage(
        name='teacher', function='stm_ray.teacher.scores:teacher_scores', command='teacher',
        reads=('synth/', 'rerankers/'), writes=('teacher/',),
        runs_when='teacher.kind is set', needs=_has_teacher,
        help=("score every shard row's candidates with a teacher (reranker or LLM feedback) for "
              "train.distill"),
        description=("Teacher scores for distillation (LLM-Embedder, GPL): for every row of the "
                     "synthesized shards (train.shards, default <run_dir>/synth), a score for the "
                     "positive and each hard negative. teacher.kind=reranker: a reranker folder "
                     "(teacher.reranker: a path, or the name of one of rerank.rerankers, trained by the "
                     "rerankers stage) in Ray Data actors; the score is its logit. teacher.kind=llm: LLM "
                     "feedback, the generator's (teacher.generator, default synth.generator) mean "
                     "log-probability of the query given the candidate (teacher.template), from vLLM's "
                     "prompt log-probabilities through ray.data.llm. Writes <run_dir>/teacher/ (the "
                     "shards with positive_score / negative_scores columns; the train stage reads them "
                     "when teacher.kind is set, and train.distill uses them). Resumable per shard; a "
                     "changed teacher or source redoes it. Runs in stm-ray run between synthesize and "
                     "train when teacher.kind is set.")),
    Stage(
        name='train', function='stm_ray.train:train_experts', command='train',
        reads=('synth/ (teacher/ with teacher.kind)',), writes=('experts/<name>/',),
        runs_when='always', needs=None,
        help=("train one LoRA expert per data source (Ray Train), in parallel"),
        description=("Contrastive training (InfoNCE over in-batch and hard negatives, same-task batches) "
                     "of one expert per 'expert' tag in the synthesized shards (train.shards, default "
                     "<run_dir>/synth), each a Ray Train run with train.num_workers workers (DDP, or "
                     "DeepSpeed with train.strategy=deepspeed), all experts at once as far as the Ray "
                     "cluster allows. Shows a progress bar per expert (step, loss, samples/s), writes "
                     "<run_dir>/experts/<name>/ (a sentence-transformers folder, LoRA merged, plus "
                     "metrics.json and loss.png) and prints a summary with dev NDCG@10 against the base. "
                     "A rerun reuses an expert whose fingerprint (model and train fields, its rows) "
                     "matches, resumes an interrupted one from its last checkpoint and retrains one whose"
                     " fingerprint changed. Joins the cluster in RAY_ADDRESS, else starts a local Ray on "
                     "127.0.0.1.")),
    Stage(
        name='instructions', function='stm_ray.tune:search_instructions', command='tune-prompts',
        reads=('data.tasks dev split', 'synth/instructions/'), writes=('search/instructions.json',),
        runs_when='always', needs=None,
        help=("Ray Tune search over query instructions (dev NDCG@10)"),
        description=("Score candidate query instructions on the dev split of data.tasks with a fixed "
                     "model (no training): no instruction, the built-in task instructions, "
                     "search.instructions and the pools Synthesize wrote. Document embeddings are "
                     "computed once; each Tune trial encodes the dev queries with one instruction. Writes"
                     " <run_dir>/search/instructions.json and instruction_trials.png; when the model is a"
                     " folder of the run (an expert, merged/) the winner becomes its saved query prompt, "
                     "and the merge search gives it to the merged model. --train instead trains one "
                     "expert per instruction-pool size in search.pool_sizes (STM's generic prompts) and "
                     "scores each. Dev sets are capped (search.dev_max_queries) and pooled "
                     "(search.dev_corpus_size) to keep trials cheap.")),
    Stage(
        name='merge', function='stm_ray.merge:search_merge', command='merge',
        reads=('experts/', 'search/instructions.json'), writes=('merged/',),
        runs_when='always', needs=None,
        help=("Ray Tune + mergekit search over merges of the experts (dev NDCG@10)"),
        description=("Merge the experts under <run_dir>/experts with mergekit's Python API (methods in "
                     "merge.methods: linear, ties, dare_ties, task_arithmetic). Ray Tune searches "
                     "per-expert weights in [0, 1] (0 drops the expert) and TIES/DARE density, with "
                     "Optuna (merge.searcher=optuna, merge.num_samples trials) or the paper's full grid "
                     "(merge.searcher=grid: merge.weight_grid x merge.density_grid). Each trial merges "
                     "into a scratch folder, scores mean dev NDCG@10 over data.tasks (Recall@10 breaks "
                     "ties) and deletes it. The winner goes to <run_dir>/merged (a sentence-transformers "
                     "folder) with merge.json (method, coefficients, dropped experts, dev scores of base,"
                     " experts and merge, the trial table); the trials are plotted in "
                     "<run_dir>/search/merge_trials.png. An interrupted search resumes; a finished one is"
                     " reused while its fingerprint (merge, model and dev-set fields, the experts, the "
                     "instruction) matches, and redone otherwise.")),
    Stage(
        name='evaluate', function='stm_ray.eval:evaluate_models', command='evaluate',
        reads=('experts/', 'merged/'), writes=('eval/<model>/<task>.json',),
        runs_when='always', needs=None,
        help=("NDCG@10, Recall@10/100, MRR@10 of a model on a task split"),
        description=("Embed a task split with a model, run exact cosine search and print the metrics "
                     "(computed as trec_eval/mteb compute them). --output writes mteb-format JSON.")),
    Stage(
        name='rerank', function='stm_ray.rerank.evaluate:rerank_models', command=None,
        reads=('merged/', 'rerankers/'), writes=('eval/rerank-<name>/<task>.json',),
        runs_when='rerank.rerankers is set', needs=_has_rerankers,
        help=("rerank the merged model's top rerank.top_k with each reranker of rerank.rerankers (test "
              "split)"),
        description=("In stm-ray run only (stm-ray evaluate --rerank FOLDER does the same for one model).")),
    Stage(
        name='serve', function='stm_ray.serve:start', command='serve',
        reads=('merged/',), writes=('(a running application)',),
        runs_when='only when asked (--serve, --stages serve)', needs=_never,
        help=("serve a retriever with Ray Serve: OpenAI-compatible /v1/embeddings and /search"),
        description=("Deploy a retriever on Ray Serve (a local Ray on 127.0.0.1 unless --address) and "
                     "keep it running until Ctrl-C. RUN_DIR_OR_MODEL is a run directory (its merged/ "
                     "model is served), a model folder or an alias. Endpoints: POST /v1/embeddings "
                     "(OpenAI format; input_type query|document picks the query instruction or the "
                     "document prefix; encoding_format float|base64), POST /search (needs --corpus), GET "
                     "/health, GET /v1/models. --corpus TASK indexes that task's corpus once (a Ray task)"
                     " into <run_dir>/index/<task>/ and reuses it while the model is unchanged. Binds "
                     "serve.host (127.0.0.1 by default); serve.token_env=VAR makes every request need "
                     "'Authorization: Bearer $VAR'. Batching, replicas (serve.min_replicas/max_replicas "
                     "autoscale), CPUs/GPUs per replica and input bounds come from the serve section. One"
                     " replica on the local Ray answers HTTP itself (serve.ingress=auto: Ray Serve's "
                     "direct ingress, no proxy hop); several replicas or --address go through Serve's "
                     "proxy (serve.ingress=proxy forces it). --write-config FILE writes a Serve config "
                     "for `serve run FILE` / `serve deploy FILE` (or a RayService) instead of starting.")),
)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
LOOP: tuple[str, ...] = tuple(s.name for s in STAGES if s.name != "serve")  # what stm-ray run runs by default
BY_COMMAND: dict[str, Stage] = {s.command: s for s in STAGES if s.command}


def stage(name: str) -> Stage:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(NAMES)}") from None


def markdown_table() -> str:
    """The README's stage table."""
    rows = ["| stage | command | writes (in the run dir) | runs when | library function |",
            "|-------|---------|-------------------------|-----------|------------------|"]
    for s in STAGES:
        cmd = f"`stm-ray {s.command}`" if s.command else "(in `stm-ray run`)"
        writes = ", ".join(f"`{w}`" if w.endswith("/") or "." in w else w for w in s.writes)
        rows.append(f"| `{s.name}` | {cmd} | {writes} | {s.runs_when} | `{s.function.replace(':', '.')}` |")
    return "\n".join(rows)


def help_lines() -> str:
    """The stages, one line each (stm-ray run --help)."""
    width = max(len(s.name) for s in STAGES)
    return "\n".join(f"  {s.name:<{width}}  {'writes ' + ', '.join(s.writes):<40} {s.runs_when}" for s in STAGES)
