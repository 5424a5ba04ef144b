from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stm_ray.config import ModelConfig
from stm_ray.modeling import Embedder, is_decoder_config

TEXTS = ["short", "a much longer text about cholera and typhoid fever in adults", "mid length text here"]


def _st(path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu")


def test_encoder_mean_pooling_normalised_and_order_invariant(tiny_bert_dir):
    e = Embedder.from_pretrained(tiny_bert_dir)
    assert (e.pooling, e.is_decoder, e.normalize) == ("mean", False, True)
    a = e.encode(TEXTS)
    assert a.shape == (3, 32) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    single = np.stack([e.encode([t])[0] for t in TEXTS])
    np.testing.assert_allclose(a, single, atol=1e-5)
    assert e.encode([]).shape == (0, 32)


def test_query_instruction_applies_to_queries_only(tiny_bert_dir):
    e = Embedder.from_pretrained(tiny_bert_dir, query_instruction="Represent the diagnosis: ")
    plain = e.encode(TEXTS)
    np.testing.assert_allclose(e.encode_corpus(TEXTS), plain, atol=1e-6)
    assert np.abs(e.encode_queries(TEXTS) - plain).max() > 1e-3
    np.testing.assert_allclose(e.encode_queries(TEXTS), e.encode(["Represent the diagnosis: " + t for t in TEXTS]), atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_encoder_folder_loads_in_sentence_transformers(tiny_bert_dir, tmp_path, pooling):
    e = Embedder.from_pretrained(tiny_bert_dir, pooling=pooling, max_length=16, query_instruction="query: ")
    out = e.save(tmp_path / "m")
    st = _st(out)
    assert st.max_seq_length == 16
    np.testing.assert_allclose(st.encode_query(TEXTS), e.encode_queries(TEXTS), atol=1e-5)
    np.testing.assert_allclose(st.encode_document(TEXTS), e.encode_corpus(TEXTS), atol=1e-5)
    again = Embedder.from_pretrained(str(out))
    assert (again.pooling, again.query_instruction, again.max_length) == (pooling, "query: ", 16)
    # the classic layout: sentence-transformers 5 and vLLM's pooling reader understand it, not only ST 6
    cfg = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert cfg["pooling_mode_mean_tokens"] is (pooling == "mean") and cfg["pooling_mode_cls_token"] is (pooling == "cls")
    assert json.loads((out / "modules.json").read_text())[0]["type"] == "sentence_transformers.models.Transformer"


def test_decoder_eos_pooling_appends_eos_after_truncation(tiny_llama_dir):
    e = Embedder.from_pretrained(tiny_llama_dir, max_length=12)
    assert e.is_decoder and e.pooling == "eos"
    eos = e.tokenizer.eos_token_id
    ids = e.tokenize(["word " * 100, "hi"])["input_ids"]
    assert ids.shape[1] == 12 and ids[0, -1].item() == eos
    enc = e.tokenizer(["hi"])["input_ids"][0]
    assert enc[-1] == eos and enc.count(eos) == 1


@pytest.mark.parametrize("bidirectional", [False, True])
def test_decoder_folder_loads_in_sentence_transformers(tiny_llama_dir, tmp_path, bidirectional):
    e = Embedder.from_pretrained(tiny_llama_dir, bidirectional=bidirectional, query_instruction="Instruct: find\nQuery: ")
    assert e.bidirectional is bidirectional
    out = e.save(tmp_path / "m")
    st = _st(out)
    np.testing.assert_allclose(st.encode_query(TEXTS), e.encode_queries(TEXTS), atol=1e-5)
    np.testing.assert_allclose(st.encode_document(TEXTS), e.encode_corpus(TEXTS), atol=1e-5)
    # one text alone (no padding) too: the causal/bidirectional choice must hold without a padding mask
    np.testing.assert_allclose(st.encode_query(TEXTS[1:2]), e.encode_queries(TEXTS[1:2]), atol=1e-5)
    again = Embedder.from_pretrained(str(out))
    assert again.bidirectional is bidirectional and again.pooling == "eos"


def test_bidirectional_attention_sees_later_tokens(tiny_llama_dir):
    causal = Embedder.from_pretrained(tiny_llama_dir, pooling="mean")
    bidi = Embedder.from_pretrained(tiny_llama_dir, pooling="mean", bidirectional=True)
    with torch.inference_mode():
        a = causal.tokenize(["alpha beta gamma"])
        b = causal.tokenize(["alpha beta delta"])
        h_ca = causal.model(**a).last_hidden_state[0, 0]
        h_cb = causal.model(**b).last_hidden_state[0, 0]
        h_ba = bidi.model(**a).last_hidden_state[0, 0]
        h_bb = bidi.model(**b).last_hidden_state[0, 0]
    torch.testing.assert_close(h_ca, h_cb)  # causal: the first position ignores what follows
    assert (h_ba - h_bb).abs().max() > 1e-4  # bidirectional: it does not


def test_decoder_detection(tiny_bert_dir, tiny_llama_dir):
    from transformers import AutoConfig

    assert not is_decoder_config(AutoConfig.from_pretrained(tiny_bert_dir))
    assert is_decoder_config(AutoConfig.from_pretrained(tiny_llama_dir))


def test_lora_attach_trains_adapters_only_and_saves_merged(tiny_llama_dir, tmp_path):
    e = Embedder.from_pretrained(tiny_llama_dir)
    before = e.encode(TEXTS)
    e.add_lora(r=4, alpha=8, dropout=0.0)
    assert e.has_lora
    trainable = [n for n, p in e.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    np.testing.assert_allclose(e.encode(TEXTS), before, atol=1e-5)  # LoRA B starts at zero
    with torch.no_grad():
        for n, p in e.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    tuned = e.encode(TEXTS)
    assert np.abs(tuned - before).max() > 1e-3
    st = _st(e.save(tmp_path / "expert"))
    np.testing.assert_allclose(st.encode_document(TEXTS), tuned, atol=1e-5)
    assert e.has_lora  # saving merged a copy, not the live adapter


def test_gradients_flow_through_forward(tiny_bert_dir):
    e = Embedder.from_pretrained(tiny_bert_dir)
    e.train()
    emb = e(e.tokenize(["a b c", "d e"]))
    emb.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in e.parameters())


def test_from_config_and_aliases(tiny_bert_dir):
    e = Embedder.from_config(ModelConfig(name_or_path=tiny_bert_dir, pooling="cls", max_length=32, batch_size=2))
    assert (e.pooling, e.max_length, e.batch_size) == ("cls", 32, 2)
    with pytest.raises(FileNotFoundError, match="aliases: minilm, smollm2"):
        Embedder.from_pretrained("./no/such/folder")


def test_minilm_alias_matches_sentence_transformers(minilm_dir):
    e = Embedder.from_pretrained("minilm")
    assert (e.pooling, e.max_length, e.normalize) == ("mean", 256, True)
    np.testing.assert_allclose(e.encode(TEXTS), _st(minilm_dir).encode(TEXTS), atol=1e-5)


@pytest.mark.slow
def test_smollm2_alias_converts_and_embeds():
    e = Embedder.from_pretrained("smollm2", max_length=64)
    assert e.is_decoder and e.pooling == "eos" and e.dim == 576
    v = e.encode(["Cholera due to Vibrio cholerae"])
    assert v.shape == (1, 576) and np.isfinite(v).all()
