"""Rerankers behind one interface, ``score(query, documents) -> scores`` (higher = more relevant):

- :class:`CrossEncoderReranker`: an encoder with a one-logit head over ``(query, document)``; score =
  sigmoid(logit). The folder is a Hugging Face sequence-classification folder that
  ``sentence_transformers.CrossEncoder(path)`` loads and scores the same way (its default activation for one label
  is the sigmoid).
- :class:`LLMReranker`: LimRank's pointwise LLM reranker. A decoder LLM reads a prompt with the instruction, the
  query and the document and answers yes or no; score = p(yes) / (p(yes) + p(no)) at the answer position, that is
  sigmoid(logit_yes - logit_no). The prompt is the folder's chat template, which takes the pair as one ``query`` and
  one ``document`` message (and an optional ``system`` message for the instruction): the convention
  sentence-transformers (>= 6) uses for causal-LM rerankers, so ``CrossEncoder(path)`` loads this folder too
  (a ``LogitScore(yes, no)`` head, sigmoid activation) and gives the same scores.

Both are trained with the same ``logits`` (what the loss sees): the one logit, or logit_yes - logit_no.
``stm_ray_reranker.json`` in the folder records the kind, the instruction and the max length;
:func:`load_reranker` reads it (a folder without it is taken as a cross-encoder, or as an LLM when its config is a
causal LM).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stm_ray.records import read_record

log = logging.getLogger("stm_ray.rerank")

RERANKER_FILE = "stm_ray_reranker.json"
DEFAULT_INSTRUCTION = ("Given a query, judge whether the document is relevant to it (answers it or is what it asks "
                       "for).")
SYSTEM = 'Judge whether the Document meets the requirements of the Query and the Instruct. Answer only "yes" or "no".'


def _first(role: str) -> str:
    return f'(messages | selectattr("role", "eq", "{role}") | map(attribute="content") | first)'


def reranker_chat_template(tokenizer, default_instruction: str = DEFAULT_INSTRUCTION) -> str:
    """A Jinja chat template that renders ``[{"role": "system"?}, {"role": "query"}, {"role": "document"}]`` as
    the model's own chat format around our yes/no prompt (the base tokenizer's template is rendered once with
    placeholders; a tokenizer without one gets a plain-text prompt). The optional system message replaces the
    instruction."""
    marks = {"INS": "\x00INS\x00", "Q": "\x00Q\x00", "D": "\x00D\x00"}
    user = f"<Instruct>: {marks['INS']}\n<Query>: {marks['Q']}\n<Document>: {marks['D']}"
    base = getattr(tokenizer, "chat_template", None)
    if base:
        text = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
                                             tokenize=False, add_generation_prompt=True)
    else:
        text = f"{SYSTEM}\n\n{user}\nAnswer: "
    exprs = {"INS": "ins", "Q": _first("query"), "D": _first("document")}
    out = [f"{{%- set ins = {_first('system')} | default({json.dumps(default_instruction)}, true) -%}}"]
    rest = text
    while rest:
        cuts = [(rest.find(m), k) for k, m in marks.items() if rest.find(m) >= 0]
        if not cuts:
            out.append("{% raw %}" + rest + "{% endraw %}")
            break
        pos, key = min(cuts)
        if pos:
            out.append("{% raw %}" + rest[:pos] + "{% endraw %}")
        out.append("{{ " + exprs[key] + " }}")
        rest = rest[pos + len(marks[key]):]
    return "".join(out)


def _answer_ids(tokenizer) -> tuple[int, int]:
    ids = []
    for word in ("yes", "no"):
        i = tokenizer.convert_tokens_to_ids(word)
        if i is None or i == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no single token {word!r}: an LLM reranker needs 'yes' and 'no' tokens")
        ids.append(int(i))
    return ids[0], ids[1]


class Reranker(nn.Module):
    """The common part: tokenized pairs -> one logit each (``logits``), ``score`` for search, ``save``."""

    kind = ""

    def __init__(self, model: nn.Module, tokenizer, *, max_length: int = 256, batch_size: int = 32,
                 name_or_path: str = "") -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.name_or_path = name_or_path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, queries: Sequence[str], documents: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def logits(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.logits(features)

    @torch.inference_mode()
    def score_pairs(self, queries: Sequence[str], documents: Sequence[str], *, batch_size: int | None = None,
                    show_progress: bool = False, logits: bool = False) -> np.ndarray:
        """Scores in [0, 1] for each (query, document) pair (``logits``: the logits they are the sigmoid of);
        longer pairs are batched together."""
        if len(queries) != len(documents):
            raise ValueError(f"{len(queries)} queries vs {len(documents)} documents")
        n = len(queries)
        out = np.empty(n, dtype=np.float32)
        bs = batch_size or self.batch_size
        order = sorted(range(n), key=lambda i: len(queries[i]) + len(documents[i]))
        steps = range(0, n, bs)
        if show_progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"rerank {Path(self.name_or_path).name}", unit="batch", mininterval=2.0)
        was = self.training
        self.eval()
        try:
            for s in steps:
                idx = order[s:s + bs]
                f = {k: v.to(self.device) for k, v in self.tokenize([queries[i] for i in idx],
                                                                    [documents[i] for i in idx]).items()}
                raw = self.logits(f).float()
                out[idx] = (raw if logits else torch.sigmoid(raw)).cpu().numpy()
        finally:
            self.train(was)
        return out

    def score(self, query: str, documents: Sequence[str], **kw: Any) -> np.ndarray:
        """One query against its documents."""
        return self.score_pairs([query] * len(documents), list(documents), **kw)

    def metadata(self) -> dict[str, Any]:
        return {"kind": self.kind, "max_length": self.max_length, "base": self.name_or_path}

    def save(self, path: str | os.PathLike, extra_metadata: dict[str, Any] | None = None) -> Path:
        """A Hugging Face folder (LoRA merged) plus stm_ray_reranker.json, written atomically."""
        from stm_ray.utils import atomic_dir

        path = Path(path)
        model = self.model
        from peft import PeftModel

        if isinstance(model, PeftModel):
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        with atomic_dir(path) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            self._save_tokenizer(tmp)
            (tmp / RERANKER_FILE).write_text(json.dumps(self.metadata() | (extra_metadata or {}), indent=2) + "\n")
        return path

    def _save_tokenizer(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder)

    def add_lora(self, r: int = 16, alpha: int = 32, dropout: float = 0.05,
                 target_modules: str | list[str] = "all-linear") -> None:
        from peft import LoraConfig, get_peft_model

        if target_modules == "all-linear":
            target_modules = [n for n, m in self.model.named_modules() if isinstance(m, nn.Linear)
                              and not n.endswith(("lm_head", "classifier", "score")) and "pooler" not in n.split(".")]
        extra = {"modules_to_save": ["classifier"]} if self.kind == "cross-encoder" else {}
        self.model = get_peft_model(self.model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                           target_modules=target_modules, **extra))


class CrossEncoderReranker(Reranker):
    """An encoder with a one-logit sequence-classification head over ``[CLS] query [SEP] document [SEP]``."""

    kind = "cross-encoder"

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, max_length: int | None = None, device: str = "cpu",
                        batch_size: int = 32, dtype: torch.dtype = torch.float32) -> CrossEncoderReranker:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from stm_ray.modeling.aliases import resolve_model

        path = resolve_model(name_or_path)
        meta = _meta(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(path)
        ml = max_length or meta.get("max_length") or min(512, getattr(tok, "model_max_length", 512) or 512)
        return cls(model, tok, max_length=ml, batch_size=batch_size, name_or_path=name_or_path).to(device).eval()

    def tokenize(self, queries: Sequence[str], documents: Sequence[str]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(list(queries), list(documents), padding=True, truncation="longest_first",
                                   max_length=self.max_length, return_tensors="pt"))

    def logits(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**features).logits[:, 0]

    def _save_tokenizer(self, folder: Path) -> None:
        # sentence-transformers' CrossEncoder reads its max length from the tokenizer and the activation from
        # config.json's "sentence_transformers" section (sigmoid for one label, as ours)
        tok = self.tokenizer
        old = tok.model_max_length
        tok.model_max_length = self.max_length
        try:
            tok.save_pretrained(folder)
        finally:
            tok.model_max_length = old
        cfg_path = folder / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["sentence_transformers"] = {"activation_fn": "torch.nn.modules.activation.Sigmoid"}
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


class LLMReranker(Reranker):
    """A decoder LLM answering yes/no; logit = logit_yes - logit_no at the last prompt position."""

    kind = "llm"

    def __init__(self, model: nn.Module, tokenizer, *, instruction: str = DEFAULT_INSTRUCTION,
                 template: str | None = None, **kw: Any) -> None:
        super().__init__(model, tokenizer, **kw)
        self.instruction = instruction
        tokenizer.padding_side = "left"  # the answer position is the last one of every row
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.yes_id, self.no_id = _answer_ids(tokenizer)
        self.template = template or reranker_chat_template(tokenizer, instruction)
        self._doc_budget = None

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, max_length: int | None = None, device: str = "cpu",
                        batch_size: int = 16, instruction: str | None = None,
                        dtype: torch.dtype = torch.float32) -> LLMReranker:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from stm_ray.modeling.aliases import resolve_model

        path = resolve_model(name_or_path)
        meta = _meta(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(path)
        # a reranker folder's chat template is its prompt; a base model gets one built around its own chat format
        template = tok.chat_template if meta.get("kind") == "llm" else None
        r = cls(model, tok, instruction=instruction or meta.get("instruction") or DEFAULT_INSTRUCTION, template=template,
                max_length=max_length or meta.get("max_length") or 512, batch_size=batch_size,
                name_or_path=name_or_path)
        return r.to(device).eval()

    def prompts(self, queries: Sequence[str], documents: Sequence[str]) -> list[str]:
        """The rendered prompts; documents are cut (by tokens) so that the prompt fits max_length."""
        docs = [self._cut(d, q) for q, d in zip(queries, documents)]
        return [self.tokenizer.apply_chat_template(
                    [{"role": "system", "content": self.instruction}, {"role": "query", "content": q},
                     {"role": "document", "content": d}],
                    chat_template=self.template, tokenize=False, add_generation_prompt=True)
                for q, d in zip(queries, docs)]

    def _cut(self, doc: str, query: str) -> str:
        if self._doc_budget is None:
            empty = self.tokenizer.apply_chat_template(
                [{"role": "system", "content": self.instruction}, {"role": "query", "content": ""},
                 {"role": "document", "content": ""}], chat_template=self.template, tokenize=False,
                add_generation_prompt=True)
            self._doc_budget = self.max_length - len(self.tokenizer(empty, add_special_tokens=False)["input_ids"])
        budget = self._doc_budget - len(self.tokenizer(query, add_special_tokens=False)["input_ids"])
        ids = self.tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(ids) <= max(budget, 8):
            return doc
        return self.tokenizer.decode(ids[:max(budget, 8)])

    def tokenize(self, queries: Sequence[str], documents: Sequence[str]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(self.prompts(queries, documents), padding=True, add_special_tokens=False,
                                   return_tensors="pt"))

    def logits(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(input_ids=features["input_ids"], attention_mask=features["attention_mask"],
                         logits_to_keep=1).logits[:, -1]
        return out[:, self.yes_id] - out[:, self.no_id]

    def metadata(self) -> dict[str, Any]:
        return super().metadata() | {"instruction": self.instruction, "answer_tokens": ["yes", "no"],
                                     "score": "p(yes) / (p(yes) + p(no)) at the last prompt position"}

    def _save_tokenizer(self, folder: Path) -> None:
        tok = self.tokenizer
        old = tok.chat_template, tok.model_max_length
        # the prompt travels with the folder (sentence-transformers reads it), and so does the max length
        tok.chat_template, tok.model_max_length = self.template, self.max_length
        try:
            tok.save_pretrained(folder)
        finally:
            tok.chat_template, tok.model_max_length = old


def vllm_reranker(path: str, **engine_kwargs: Any):
    """vLLM's own loader for a yes/no LLM reranker folder: the causal LM served as a sequence classifier whose one
    score is softmax(logit_yes, logit_no)[yes] (``classifier_from_token`` + ``from_2_way_softmax``, as vLLM loads
    Qwen3-Reranker), scoring with the folder's chat template. Returns ``(llm, score)``: ``score(query, documents)``
    gives what :meth:`LLMReranker.score` gives (tested to 1e-6 on a CPU). ``engine_kwargs`` go to ``vllm.LLM``
    (on a CPU: :func:`stm_ray.modeling.vllm_engine.cpu_engine_kwargs`)."""
    from transformers import AutoConfig, AutoTokenizer
    from vllm import LLM

    from stm_ray.modeling.aliases import resolve_model

    folder = resolve_model(path)
    if reranker_kind(folder) != "llm":
        raise ValueError(f"{path}: not an LLM reranker (stm_ray_reranker.json kind 'llm', or a causal LM)")
    arch = AutoConfig.from_pretrained(folder).architectures[0].replace("ForCausalLM", "ForSequenceClassification")
    template = AutoTokenizer.from_pretrained(folder).chat_template
    llm = LLM(model=folder, runner="pooling", hf_overrides={"architectures": [arch], "method": "from_2_way_softmax",
                                                              "classifier_from_token": ["no", "yes"]}, **engine_kwargs)

    def score(query: str, documents: Sequence[str]) -> np.ndarray:
        out = llm.score(query, list(documents), chat_template=template, use_tqdm=False)
        return np.array([o.outputs.score for o in out], dtype=np.float32)

    return llm, score


def _meta(path: str) -> dict[str, Any]:
    return read_record(Path(path) / RERANKER_FILE, kind="reranker metadata") or {}


def reranker_kind(path: str) -> str:
    """'llm' or 'cross-encoder' for a folder (stm_ray_reranker.json, else its architecture)."""
    from transformers import AutoConfig

    from stm_ray.modeling.aliases import resolve_model

    resolved = resolve_model(path)
    kind = _meta(resolved).get("kind")
    if kind:
        return kind
    arch = (getattr(AutoConfig.from_pretrained(resolved), "architectures", None) or [""])[0]
    return "llm" if arch.endswith("ForCausalLM") else "cross-encoder"


def load_reranker(path: str, *, kind: str | None = None, device: str = "cpu", **kw: Any) -> Reranker:
    """A reranker from a folder (ours, a sentence-transformers cross-encoder, or a yes/no LLM reranker)."""
    from stm_ray.utils import resolve_device

    kind = kind or reranker_kind(path)
    cls = LLMReranker if kind == "llm" else CrossEncoderReranker
    return cls.from_pretrained(path, device=str(resolve_device(device)), **kw)
