"""One embedding model class over Hugging Face encoders and decoder-only LLMs.

Encoders (BERT, MiniLM, ...) pool by mean or CLS; decoder-only LLMs (Llama, Qwen, SmolLM2, ...) pool the hidden
state of an EOS token that the tokenizer appends (its post-processor is set so truncation keeps room for it),
optionally with the causal mask turned off (``bidirectional``, as in STM; stored as ``config.is_causal=False``
so every loader of the saved folder honours it). Queries get an instruction prefix; documents none by default.

:meth:`Embedder.save` writes a plain sentence-transformers folder: ``SentenceTransformer(path)`` loads the same
pooling, normalisation, max length and query prompt (``encode_query`` applies it) and gives the same vectors.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

Pooling = Literal["mean", "cls", "eos"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# our pooling name -> the key of sentence-transformers' classic 1_Pooling/config.json (also read by vLLM)
_ST_POOLING_KEYS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "eos": "pooling_mode_lasttoken"}
_ST_OTHER_POOLING_KEYS = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")
META_FILE = "stm_ray.json"


def truncate(emb: np.ndarray, dim: int | None, normalize: bool = True) -> np.ndarray:
    """Embeddings cut to their first ``dim`` coordinates (Matryoshka), renormalised when the model normalises."""
    if not dim or dim >= emb.shape[-1]:
        return emb
    out = np.ascontiguousarray(emb[..., :dim])
    if normalize:
        out /= np.clip(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12, None)
    return out


def instruction_prefix(instruction: str | None) -> str:
    """The query prefix for an instruction: a sentence becomes ``"Instruct: {sentence}\nQuery: "`` (E5-mistral and
    STM's format); text that already ends in whitespace (``"query: "``, ``"Instruct: ...\nQuery: "``) is a prefix
    as it is; None or blank gives no prefix."""
    if not instruction or not instruction.strip():
        return ""
    if instruction[-1].isspace():
        return instruction
    return f"Instruct: {instruction.strip()}\nQuery: "


def save_query_prompt(folder: str | os.PathLike, instruction: str | None) -> str:
    """Make ``instruction`` (as a prefix) the saved query prompt of a model folder: sentence-transformers'
    ``prompts.query`` and ``stm_ray.json``, the two places every loader reads. Returns the prefix."""
    from stm_ray.utils import atomic_write_text

    prefix = instruction_prefix(instruction)
    folder = Path(folder)
    for name, key in (("config_sentence_transformers.json", "prompts"), (META_FILE, "query_instruction")):
        f = folder / name
        if f.is_file():
            obj = json.loads(f.read_text(encoding="utf-8"))
            if key == "prompts":
                obj.setdefault("prompts", {})["query"] = prefix
            else:
                obj[key] = prefix
            atomic_write_text(f, json.dumps(obj, indent=2) + "\n")
    return prefix


def is_decoder_config(config) -> bool:
    """Decoder-only LLM: has a causal-LM head class and no masked-LM one (BERT-likes have both)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    mt = getattr(config, "model_type", "")
    if getattr(config, "is_encoder_decoder", False):
        return False
    return mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def read_st_folder(path: Path) -> dict[str, Any]:
    """Settings a sentence-transformers folder declares: pooling, normalize, max_length, query prompt, subfolder."""
    out: dict[str, Any] = {}
    modules = _read_json(path / "modules.json")
    if not isinstance(modules, list):
        return out
    out["normalize"] = False
    for m in modules:
        kind = m.get("type", "")
        sub = path / m.get("path", "")
        if kind.endswith("Transformer"):
            out["subfolder"] = m.get("path", "")
            cfg = _read_json(sub / "sentence_bert_config.json")
            if cfg.get("max_seq_length"):
                out["max_length"] = int(cfg["max_seq_length"])
        elif kind.endswith("Pooling"):
            cfg = _read_json(sub / "config.json")
            mode = cfg.get("pooling_mode")
            if isinstance(mode, list):
                mode = mode[0] if len(mode) == 1 else None
            if mode is not None:  # sentence-transformers >= 6 layout
                out["pooling"] = {"cls": "cls", "mean": "mean", "lasttoken": "eos"}.get(mode)
            else:
                out["pooling"] = next((ours for ours, key in _ST_POOLING_KEYS.items() if cfg.get(key)), None)
        elif kind.endswith("Normalize"):
            out["normalize"] = True
    prompts = _read_json(path / "config_sentence_transformers.json").get("prompts") or {}
    if prompts.get("query"):
        out["query_instruction"] = prompts["query"]
    if prompts.get("document"):
        out["document_instruction"] = prompts["document"]
    return out


def ensure_eos_appended(tokenizer) -> bool:
    """Make the tokenizer append EOS to every sequence (after truncation), via its post-processor.

    Returns True when the tokenizer now ends every encoding with EOS. Works on fast tokenizers; the setting is
    stored in tokenizer.json, so the saved folder keeps it.
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        return False
    if tokenizer("a")["input_ids"][-1] == eos_id:
        return True
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return False
    from tokenizers import processors

    ids = tokenizer("a")["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token
    adds_bos = bos is not None and len(ids) > len(bare) and ids[0] == tokenizer.bos_token_id
    eos = tokenizer.eos_token
    single = ([f"{bos}:0"] if adds_bos else []) + ["$A:0", f"{eos}:0"]
    pair = ([f"{bos}:0"] if adds_bos else []) + ["$A:0", f"{eos}:0", "$B:1", f"{eos}:1"]
    special = [(eos, eos_id)] + ([(bos, tokenizer.bos_token_id)] if adds_bos else [])
    backend.post_processor = processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                                           special_tokens=special)
    return tokenizer("a")["input_ids"][-1] == eos_id


class Embedder(nn.Module):
    """A text embedding model: ``encode_queries`` / ``encode_corpus`` for search, ``forward`` for training.

    Build it with :meth:`from_pretrained` (a folder, hub id or alias such as ``minilm`` / ``smollm2``) or
    :meth:`from_config` (a :class:`stm_ray.config.ModelConfig`).
    """

    def __init__(self, model: nn.Module, tokenizer, *, pooling: Pooling, normalize: bool = True, max_length: int = 512,
                 query_instruction: str | None = None, document_instruction: str | None = None,
                 is_decoder: bool = False, batch_size: int = 64, name_or_path: str = "") -> None:
        super().__init__()
        if pooling not in ("mean", "cls", "eos"):
            raise ValueError(f"pooling must be one of mean, cls, eos; got {pooling!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.max_length = max_length
        self.query_instruction = query_instruction  # type: ignore[assignment]  (the setter formats it)
        self.document_instruction = document_instruction or ""
        self.is_decoder = is_decoder
        self.batch_size = batch_size
        self.name_or_path = name_or_path
        self.matryoshka_dims: list[int] | None = None  # prefixes trained to be retrievers of their own
        self.truncate_dim: int | None = None  # encode() cuts embeddings to this many coordinates (renormalised)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if pooling == "eos" and not ensure_eos_appended(tokenizer):
            raise ValueError(f"{name_or_path}: eos pooling needs a fast tokenizer with an EOS token")

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, name_or_path: str, *, pooling: str = "auto", normalize: bool | None = None,
                        max_length: int | None = None, query_instruction: str | None = None,
                        document_instruction: str | None = None, bidirectional: bool | None = None,
                        dtype: str = "float32", device: str = "auto", batch_size: int = 64) -> Embedder:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from stm_ray.modeling.aliases import resolve_model
        from stm_ray.utils import resolve_device

        path = resolve_model(name_or_path)
        local = Path(path)
        st = read_st_folder(local) if local.is_dir() else {}
        meta = _read_json(local / META_FILE) if local.is_dir() else {}
        sub = st.get("subfolder", "")
        model_dir = str(local / sub) if local.is_dir() and sub else path
        config = AutoConfig.from_pretrained(model_dir)
        decoder = is_decoder_config(config)
        if pooling == "auto":
            pooling = st.get("pooling") or meta.get("pooling") or ("eos" if decoder else "mean")
        if bidirectional is None:
            bidirectional = meta.get("bidirectional", getattr(config, "is_causal", True) is False)
        if bidirectional and decoder:
            config.is_causal = False
        model = AutoModel.from_pretrained(model_dir, config=config, dtype=_DTYPES[dtype])
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if max_length is None:
            max_length = st.get("max_length") or meta.get("max_length") or min(512, getattr(tokenizer, "model_max_length", 512) or 512)
        emb = cls(model, tokenizer, pooling=pooling,  # type: ignore[arg-type]
                  normalize=st.get("normalize", meta.get("normalize", True)) if normalize is None else normalize,
                  max_length=max_length,
                  query_instruction=query_instruction if query_instruction is not None else st.get("query_instruction", meta.get("query_instruction")),
                  document_instruction=document_instruction if document_instruction is not None else st.get("document_instruction"),
                  is_decoder=decoder, batch_size=batch_size, name_or_path=name_or_path)
        if bidirectional:
            emb.set_bidirectional(True)
        emb.matryoshka_dims = meta.get("matryoshka_dims")
        emb.to(resolve_device(device))
        emb.eval()
        return emb

    @classmethod
    def from_config(cls, cfg) -> Embedder:
        """Build from a :class:`stm_ray.config.ModelConfig`."""
        return cls.from_pretrained(**cls.config_kwargs(cfg))

    @staticmethod
    def config_kwargs(cfg) -> dict[str, Any]:
        """:meth:`from_pretrained` arguments for a ModelConfig: plain values, for Ray actors that build their own."""
        return {"name_or_path": cfg.name_or_path, "pooling": cfg.pooling, "normalize": cfg.normalize,
                "max_length": cfg.max_length, "query_instruction": cfg.query_instruction,
                "document_instruction": cfg.document_instruction, "bidirectional": cfg.bidirectional or None,
                "dtype": cfg.dtype, "device": cfg.device, "batch_size": cfg.batch_size}

    # ---------------------------------------------------------------- properties
    @property
    def query_instruction(self) -> str:
        """The query prefix; setting an instruction sentence stores it as a prefix (:func:`instruction_prefix`)."""
        return self._query_instruction

    @query_instruction.setter
    def query_instruction(self, instruction: str | None) -> None:
        self._query_instruction = instruction_prefix(instruction)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return int(self.base_config.hidden_size)

    @property
    def base_config(self):
        return self.model.config

    @property
    def bidirectional(self) -> bool:
        return self.is_decoder and getattr(self.base_config, "is_causal", True) is False

    def set_bidirectional(self, on: bool = True) -> None:
        """Turn the causal mask of a decoder off (or back on); a no-op for encoders."""
        if not self.is_decoder:
            return
        self.base_config.is_causal = not on
        for m in self.model.modules():
            if hasattr(m, "is_causal") and m is not self.model:
                m.is_causal = not on

    # ---------------------------------------------------------------- encoding
    def tokenize(self, texts: Sequence[str], prompt: str = "", padding: bool | str = True) -> dict[str, torch.Tensor]:
        return self.tokenizer([prompt + t for t in texts], padding=padding, truncation=True,
                              max_length=self.max_length, return_tensors="pt")

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "mean":
            m = mask.unsqueeze(-1).to(hidden.dtype)
            out = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        elif self.pooling == "cls":
            out = hidden[:, 0]
        else:  # last attended position: works for left and right padding
            pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
            last = (pos * mask).argmax(dim=1)
            out = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return out

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embeddings for a tokenized batch (with gradients when training)."""
        kwargs = {k: v for k, v in features.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        out = self.model(**kwargs)
        emb = self.pool(out.last_hidden_state, features["attention_mask"]).float()
        if self.normalize:
            emb = nn.functional.normalize(emb, p=2, dim=-1)
        return emb

    def token_ids(self, texts: Sequence[str], prompt: str = "", **kw):
        """Unpadded, truncated token ids of ``prompt + text`` (the tokenizer's BatchEncoding)."""
        return self.tokenizer([prompt + t for t in texts] if prompt else list(texts), truncation=True,
                              max_length=self.max_length, padding=False, **kw)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], *, prompt: str = "", batch_size: int | None = None,
               show_progress: bool = False, desc: str = "encode") -> np.ndarray:
        """Embed texts in length-sorted batches (little padding); returns float32 [n, dim] in input order."""
        from tqdm.auto import tqdm

        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, min(self.dim, self.truncate_dim or self.dim)), dtype=np.float32)
        bs = batch_size or self.batch_size
        enc = self.token_ids(texts, prompt, return_attention_mask=True)
        order = np.argsort([-len(x) for x in enc["input_ids"]], kind="stable")
        was_training = self.training
        self.eval()
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        interval = 0.1 if sys.stderr.isatty() else 15.0  # logs, not a flood of carriage returns
        with tqdm(total=len(texts), desc=desc, unit="text", disable=not show_progress, leave=False,
                  mininterval=interval) as bar:
            for start in range(0, len(texts), bs):
                idx = order[start:start + bs]
                batch = self.tokenizer.pad({k: [enc[k][i] for i in idx] for k in keys}, return_tensors="pt")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                out[idx] = self.forward(batch).cpu().numpy()
                bar.update(len(idx))
        self.train(was_training)
        return truncate(out, self.truncate_dim, self.normalize)

    def encode_queries(self, queries: Sequence[str], **kw) -> np.ndarray:
        """Queries get the query instruction prefix."""
        return self.encode(queries, prompt=self.query_instruction, desc=kw.pop("desc", "queries"), **kw)

    def encode_corpus(self, docs: Sequence[str], **kw) -> np.ndarray:
        """Documents get the document prefix (none by default)."""
        return self.encode(docs, prompt=self.document_instruction, desc=kw.pop("desc", "corpus"), **kw)

    @staticmethod
    def similarity(q: torch.Tensor | np.ndarray, d: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Cosine similarity matrix [n_q, n_d]."""
        q = torch.as_tensor(q, dtype=torch.float32)
        d = torch.as_tensor(d, dtype=torch.float32)
        return nn.functional.normalize(q, dim=-1) @ nn.functional.normalize(d, dim=-1).T

    # ---------------------------------------------------------------- LoRA
    def add_lora(self, r: int = 16, alpha: int = 32, dropout: float = 0.05,
                 target_modules: str | list[str] = "all-linear") -> None:
        """Wrap the backbone in a peft LoRA adapter (only adapter weights train)."""
        from peft import LoraConfig, get_peft_model

        if target_modules == "all-linear":
            # peft's "all-linear" would also adapt an encoder's pooler, whose output embeddings never use: its
            # adapter would get no gradient (and DDP refuses parameters without one).
            target_modules = [n for n, m in self.model.named_modules()
                              if isinstance(m, nn.Linear) and "pooler" not in n.split(".") and not n.endswith("lm_head")]
        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                         task_type="FEATURE_EXTRACTION")
        self.model = get_peft_model(self.model, cfg)

    @property
    def has_lora(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    def merged_backbone(self) -> nn.Module:
        """The backbone with any LoRA weights folded in (a copy; self is untouched)."""
        if not self.has_lora:
            return self.model
        return copy.deepcopy(self.model).merge_and_unload()

    # ---------------------------------------------------------------- saving
    def metadata(self) -> dict[str, Any]:
        return {"pooling": self.pooling, "normalize": self.normalize, "max_length": self.max_length,
                "query_instruction": self.query_instruction, "document_instruction": self.document_instruction,
                "is_decoder": self.is_decoder, "bidirectional": self.bidirectional, "base": self.name_or_path,
                "matryoshka_dims": self.matryoshka_dims}

    def _write_sentence_transformers_config(self, folder: Path) -> None:
        """The classic sentence-transformers layout (as all-MiniLM-L6-v2 ships it): sentence-transformers 5 and 6
        and vLLM's pooling-config reader all understand it, and writing it needs no second model load."""
        import sentence_transformers
        import transformers

        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if self.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
            (folder / "2_Normalize").mkdir(exist_ok=True)
        pooling = {"word_embedding_dimension": self.dim}
        pooling |= {key: ours == self.pooling for ours, key in _ST_POOLING_KEYS.items()}
        pooling |= {key: False for key in _ST_OTHER_POOLING_KEYS}
        pooling["include_prompt"] = True
        (folder / "1_Pooling").mkdir(exist_ok=True)
        files = {
            "modules.json": modules,
            "sentence_bert_config.json": {"max_seq_length": self.max_length, "do_lower_case": False},
            "1_Pooling/config.json": pooling,
            "config_sentence_transformers.json": {
                "__version__": {"sentence_transformers": sentence_transformers.__version__,
                                "transformers": transformers.__version__, "pytorch": torch.__version__},
                "prompts": {"query": self.query_instruction, "document": self.document_instruction},
                "default_prompt_name": None, "similarity_fn_name": "cosine" if self.normalize else "dot",
                # informational (sentence-transformers ignores it): the dimensions worth passing as truncate_dim
                **({"matryoshka_dims": self.matryoshka_dims} if self.matryoshka_dims else {})},
        }
        for name, obj in files.items():
            (folder / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")

    def save(self, path: str | os.PathLike, extra_metadata: dict[str, Any] | None = None) -> Path:
        """Write a sentence-transformers folder (weights with LoRA merged), atomically: temp folder, then rename."""
        from stm_ray.utils import atomic_dir

        path = Path(path)
        with atomic_dir(path) as tmp:
            self.merged_backbone().save_pretrained(tmp, safe_serialization=True)
            # sentence-transformers >= 6 formats texts with a tokenizer's chat template when it has one;
            # an embedding folder must tokenize plain text, as encode() does.
            tok = copy.deepcopy(self.tokenizer)
            tok.chat_template = None
            tok.save_pretrained(tmp)
            self._write_sentence_transformers_config(tmp)
            meta = self.metadata() | (extra_metadata or {})
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return path
