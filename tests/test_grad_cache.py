"""GradCache and Matryoshka without a cluster: the cached step's parameter gradients equal the plain step's on the
same batch (encoder, LoRA, decoder with EOS pooling and bidirectional attention, Matryoshka loss, mini-batches by a
token budget), and the Matryoshka loss can fail."""

from __future__ import annotations

import pytest
import torch

from stm_ray.config import grad_cache_size
from stm_ray.train.batching import TrainRows, build_batch
from stm_ray.train.grad_cache import grad_cache_step, mini_batches, plan_mini_batches, token_bounds
from stm_ray.train.loss import contrastive_step_loss
from stm_ray.train.worker import TwoTower
from tests.conftest import DOCS, QUERIES


def _rows() -> TrainRows:
    ids = sorted(DOCS)
    queries, positives, negatives = [], [], []
    for j, (qid, q) in enumerate(sorted(QUERIES.items())):
        did = "d" + qid[1:]
        queries.append(q)
        positives.append(" ".join(DOCS[did]))
        negatives.append([" ".join(DOCS[ids[(j + 1) % 8]]), " ".join(DOCS[ids[(j + 3) % 8]])][: 1 + j % 2])
    return TrainRows(queries, positives, negatives, ["Find it"] * 8, ["t"] * 8)


def _setup(path: str, lora: bool = False, **kw):
    from stm_ray.modeling import Embedder

    torch.manual_seed(0)
    emb = Embedder.from_pretrained(path, device="cpu", **kw)
    if lora:
        emb.add_lora(r=4, alpha=8, dropout=0.0)
    emb.train()
    return emb, TwoTower(emb)


def _loss_fn(wb, dims=None):
    def loss_fn(q, d_rows):
        valid = wb.doc_valid
        d = d_rows.new_zeros((len(valid), d_rows.shape[-1])).index_put((valid.nonzero().squeeze(1),), d_rows)
        return contrastive_step_loss(q, d, n_neg=wb.n_neg, doc_valid=valid, doc_keys=wb.doc_keys, temperature=0.05,
                                     gather=False, dims=dims)
    return loss_fn


def _grads(net) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("case", ["encoder", "lora", "decoder", "matryoshka", "tokens"])
def test_grad_cache_gradients_equal_the_plain_step(case, tiny_bert_nodrop_dir, tiny_llama_dir):
    rows = _rows()
    wb = build_batch(rows, torch.arange(8).numpy(), n_neg=2, instruction_mode="fixed", fixed_instruction="q: ",
                     pool=[], seed=1, step=0)
    assert not wb.doc_valid.all()  # some negative slots are padding: the mapping must skip them
    kw = {"pooling": "eos", "bidirectional": True} if case == "decoder" else {}
    path = tiny_llama_dir if case == "decoder" else tiny_bert_nodrop_dir
    dims = [32, 16, 8] if case == "matryoshka" else None
    emb, net = _setup(path, lora=case == "lora", **kw)
    loss_fn = _loss_fn(wb, dims)

    q, d = net(emb.tokenize(wb.queries), emb.tokenize(wb.docs))
    plain_loss = loss_fn(q, d)
    plain_loss.backward()
    plain = _grads(net)
    net.zero_grad(set_to_none=True)

    size = "200 tokens" if case == "tokens" else 3
    if case == "tokens":  # uneven groups, several of them
        sizes = [g[0].stop - g[0].start for g in plan_mini_batches(emb.tokenize, wb.queries, wb.docs, wb.doc_valid,
                                                                    wb.n_neg, size)]
        assert len(sizes) >= 3 and len(set(sizes)) > 1, sizes
    cached_loss = grad_cache_step(net, emb.tokenize, wb.queries, wb.docs, wb.doc_valid, wb.n_neg, size, loss_fn,
                                  device=torch.device("cpu"))
    cached = _grads(net)
    assert plain and set(cached) == set(plain)
    torch.testing.assert_close(cached_loss, plain_loss.detach(), rtol=1e-5, atol=1e-6)
    for name, g in plain.items():  # float tolerance relative to each tensor's scale (sums in another order)
        err = (cached[name] - g).abs().max().item()
        assert err <= 1e-4 * g.abs().max().item() + 1e-9, (name, err)


def test_mini_batches_keep_each_query_with_its_documents():
    valid = torch.tensor([1, 1, 1, 1, 1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)  # 4 queries, 2 negative slots each
    groups = mini_batches(4, 2, valid, 3)
    assert [g[0] for g in groups] == [slice(0, 3), slice(3, 4)]
    # valid docs in slot order: positives 0-3 -> 0..3, slot 4 -> 4, slot 6 -> 5, slot 7 -> 6, slot 10 -> 7
    assert groups[0][1].tolist() == [0, 1, 2, 4, 5, 6] and groups[1][1].tolist() == [3, 7]


def test_token_budget_groups_queries_by_their_padded_forward():
    q_lens = torch.tensor([4, 4, 4, 4, 2, 2])
    d_lens = torch.tensor([10, 10, 10, 10, 5, 5, 10, 10, 10, 50, 5, 0])  # 6 positives, then 1 negative slot each
    valid = d_lens > 0
    bounds = token_bounds(q_lens, d_lens, 1, valid, 50)
    # 2 x 4 + 4 x 10 = 48 fits, a third query would make 72; query 3 has a 50-token negative: alone (over budget,
    # but a query's texts are never split); the two short queries fit together: 2 x 2 + 3 x 5 = 19
    assert bounds == [(0, 2), (2, 3), (3, 4), (4, 6)]
    groups = mini_batches(6, 1, valid, bounds)
    assert [g[1].tolist() for g in groups] == [[0, 1, 6, 7], [2, 8], [3, 9], [4, 5, 10]]
    assert grad_cache_size(8) == ("queries", 8) and grad_cache_size("4096 tokens") == ("tokens", 4096)
    assert grad_cache_size("512t") == ("tokens", 512) and grad_cache_size("16") == ("queries", 16)
    for bad in ("many", "0 tokens", 0, "-3"):
        with pytest.raises(ValueError, match="GradCache mini-batch"):
            grad_cache_size(bad)


def test_matryoshka_loss_counts_every_prefix_and_can_fail():
    torch.manual_seed(0)
    q = torch.randn(4, 32)
    d = torch.cat([q + 0.1 * torch.randn(4, 32), torch.randn(4, 32)])
    valid, keys = torch.ones(8, dtype=torch.bool), torch.arange(8)
    one = contrastive_step_loss(q, d, n_neg=1, doc_valid=valid, doc_keys=keys, temperature=0.05, gather=False)
    both = contrastive_step_loss(q, d, n_neg=1, doc_valid=valid, doc_keys=keys, temperature=0.05, gather=False,
                                 dims=[32, 8])
    eight = contrastive_step_loss(q[:, :8], d[:, :8], n_neg=1, doc_valid=valid, doc_keys=keys, temperature=0.05,
                                  gather=False)
    torch.testing.assert_close(both, one + eight)
    # the first 8 coordinates carry no signal: the Matryoshka loss sees it, the full-dimension loss does not
    d_bad = d.clone()
    d_bad[:4, :8] = torch.randn(4, 8) * 5
    bad = contrastive_step_loss(q, d_bad, n_neg=1, doc_valid=valid, doc_keys=keys, temperature=0.05, gather=False,
                                dims=[32, 8])
    assert bad > both + 1.0
