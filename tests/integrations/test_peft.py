"""Bayesian LoRA (``spar.integrations.peft``) on a tiny Llama built from a config (random
weights, nothing downloaded): BLoB's choices, a frozen deterministic base, the folded batch
through attention, per-token noise keys, the next-token uncertainty through
``spar.metrics``, and a few training steps on two ranks equal to one process (I3).
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import spar
import spar.distributed as sd
import spar.nn as snn
from spar.integrations.peft import BayesLoraA, CausalLM, bayesianize_lora, next_token

VOCAB, T = 64, 8
S, B = 4, 4  # samples, global batch of sequences
SEED = 9
STEPS = 3


def _tiny_lm(init_lora_weights: bool = True, eps: float = 0.05, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
        init_lora_weights=init_lora_weights,
    )  # fmt: skip
    return bayesianize_lora(get_peft_model(LlamaForCausalLM(config), lora), eps=eps, **kwargs)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.int64)
    # left padding, as much in each half of the batch: the ELBO is a mean over the tokens of
    # each rank, so data shards with different token counts would weigh tokens differently
    mask[1, :3] = 0
    mask[3, :3] = 0
    return ids, mask


def _train(lm: nn.Module, forward, ids, mask, group) -> dict:
    """STEPS Adam steps on the same batch; the trainable parameters and last gradients."""
    trainable = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=1e-2)
    for _ in range(STEPS):
        out, target = next_token(forward(ids, attention_mask=mask), ids, mask)
        kl = snn.kl_divergence(lm)
        loss = spar.losses.elbo(out, target, kl=kl, dataset_size=1000, group=group)
        opt.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.requires_grad}
        opt.step()
    params = {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}
    return {"params": params, "grads": grads}


def _reference() -> dict:
    lm = CausalLM(_tiny_lm(init_lora_weights=False, eps=0.3))
    mc = snn.MonteCarlo(lm, S, seed=SEED, fold_input=True)
    ids, mask = _batch()
    res = _train(lm, mc, ids, mask, None)
    mc.eval()
    with torch.no_grad():
        res["predict"] = mc(ids, attention_mask=mask)
    return res


def lora_job(ctx: dict) -> dict:
    res = {}
    grid = sd.init(sample=2)
    for g in (grid, sd.make_grid(sample=1, data=2)):
        lm = CausalLM(_tiny_lm(init_lora_weights=False, eps=0.3))
        sp = sd.SampleParallel(lm, S, g, seed=SEED, fold_input=True, augment=None)
        ids, mask = _batch()
        b_local = B // g.data
        rows = slice(g.data_rank * b_local, (g.data_rank + 1) * b_local)
        run = _train(lm, sp, ids[rows], mask[rows], g.sample_group)
        run["predict"] = sp.predict(ids[rows], attention_mask=mask[rows])
        run["rows"] = rows
        res[f"{g.sample}x{g.data}"] = run
    sd.shutdown()
    return res


@pytest.mark.slow
def test_lora_two_ranks_equal_one_process(run_workers):
    from tests.distributed.test_dist_sample_parallel import _check_rel

    results = run_workers("lora_job", 2, launch="torchrun", timeout=180)
    ref = _reference()
    for rank, res in enumerate(results):
        for key, run in res.items():
            assert run["params"].keys() == ref["params"].keys()
            for name, want in ref["params"].items():
                _check_rel(run["params"][name], want, f"rank {rank} grid {key}: {name}")
                _check_rel(run["grads"][name], ref["grads"][name], f"rank {rank} {key} grad {name}")
            want = ref["predict"][:, run["rows"]]
            _check_rel(run["predict"], want, f"rank {rank} grid {key}: predict")


def test_only_lora_a_is_bayesian_with_blob_choices():
    model = _tiny_lm()
    lora_a = [(n, m) for n, m in model.named_modules() if isinstance(m, BayesLoraA)]
    assert len(lora_a) == 4  # q_proj and v_proj of 2 layers
    assert all(snn.is_bayesian(m) == isinstance(m, BayesLoraA) for m in model.modules())
    for name, a in lora_a:
        assert a.noise_name == name and a.estimator == "flipout"
        assert "bias" not in a.bayes_names
        sigma = a.sigma("weight").detach()
        assert float(sigma.min()) >= 0.05**2 / 2 * (1 - 1e-5)
        assert float(sigma.max()) <= 0.05**2 * (1 + 1e-5)
        assert torch.all(a.weight_prior_std == 0.2) and torch.all(a.weight_prior_mean == 0)
        assert a.weight is a.weight_mu
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(not n.endswith("lora_B.default.bias") for n in trainable)
    with pytest.raises(ValueError, match="no LoRA Linear adapters"):
        bayesianize_lora(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="Bayesian already"):
        bayesianize_lora(model)
    with pytest.raises(ValueError, match="prior_std must be finite and > 0"):
        _tiny_lm(prior_std=0.0)


def test_base_stays_frozen_and_deterministic():
    """With LoRA's B = 0 the adapters add nothing, so every sample is the base model: the
    base draws no weights; a training step moves the adapters only."""
    lm = CausalLM(_tiny_lm())
    mc = snn.MonteCarlo(lm, S, seed=SEED, fold_input=True)
    ids, mask = _batch()
    frozen = {n: p.detach().clone() for n, p in lm.named_parameters() if not p.requires_grad}
    logits = mc(ids, attention_mask=mask)  # (S, B, T, V)
    assert logits.shape == (S, B, T, VOCAB)
    for s in range(1, S):
        assert torch.equal(logits[s], logits[0])
    out, target = next_token(logits, ids, mask)
    loss = spar.losses.elbo(out, target, kl=snn.kl_divergence(lm), dataset_size=100)
    loss.backward()
    torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=0.1).step()
    for n, p in lm.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    assert all(p.grad is None for p in lm.parameters() if not p.requires_grad)


def test_next_token_uncertainty_through_metrics():
    lm = CausalLM(_tiny_lm(init_lora_weights=False, eps=0.3))
    mc = snn.MonteCarlo(lm, 16, seed=SEED, fold_input=True).eval()
    ids, mask = _batch()
    with torch.no_grad():
        last = mc(ids, attention_mask=mask)[:, :, -1]  # (S, B, V): the next token's logits
    entropy = spar.metrics.predictive_entropy(last)
    mi = spar.metrics.mutual_information(last)
    aleatoric = spar.metrics.expected_entropy(last)
    assert entropy.shape == mi.shape == (B,)
    assert torch.all(mi > 1e-4)  # the Bayesian adapters disagree
    assert torch.all(entropy <= math.log(VOCAB) + 1e-5)
    torch.testing.assert_close(mi, entropy - aleatoric, rtol=0, atol=1e-5)
    # the same computation from the probabilities, directly
    probs = last.softmax(-1)
    mean = probs.mean(0)
    want_h = -(mean * mean.log()).sum(-1)
    want_mi = want_h + (probs * probs.log()).sum(-1).mean(0)
    torch.testing.assert_close(entropy, want_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mi, want_mi, rtol=1e-4, atol=1e-5)


def test_per_token_noise_is_keyed_by_global_token_index():
    """A data shard of the sequences draws, for every token, the flipout noise that the whole
    batch draws for it: the key is the global token index, not the row of the shard."""
    torch.manual_seed(0)
    layer = BayesLoraA(8, 4, bias=False, init_sigma=0.5, estimator="flipout")
    layer.noise_name = "a"
    x = torch.randn(S, 6, 5, 8)  # (S, B, T, K)
    with snn.sampling(S, seed=1, step=0):
        full = layer(x.reshape(S * 6, 5, 8)).reshape(S, 6, 5, 4)
    with snn.sampling(S, seed=1, step=0, data_offset=2):
        part = layer(x[:, 2:5].reshape(S * 3, 5, 8)).reshape(S, 3, 5, 4)
    torch.testing.assert_close(part, full[:, 2:5], rtol=1.3e-6, atol=1e-5)
    # and it is per token: two tokens of the same input get different signs
    same = x[:, :1, :1].expand(S, 1, 2, 8).reshape(S, 2, 8)
    with snn.sampling(S, seed=1, step=0):
        y = layer(same)
    assert not torch.allclose(y[:, 0], y[:, 1])


def test_attention_mask_is_repeated_for_the_folded_samples():
    lm = CausalLM(_tiny_lm(init_lora_weights=False))
    ids, mask = _batch()
    folded_ids = ids.repeat(S, 1)
    with snn.sampling(S, seed=1, step=0):
        a = lm(folded_ids, attention_mask=mask)
    with snn.sampling(S, seed=1, step=0):
        b = lm(folded_ids, attention_mask=mask.repeat(S, 1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="fits neither"):
        lm(folded_ids, attention_mask=mask[:3])


def test_shared_input_is_refused_with_the_fix():
    mc = snn.MonteCarlo(CausalLM(_tiny_lm()), S, seed=SEED)  # fold_input=False
    ids, mask = _batch()
    with pytest.raises(ValueError, match="fold_input=True"):
        mc(ids, attention_mask=mask)


def test_next_token_drops_padding_and_checks_shapes():
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    logits = torch.randn(2, 2, 4, VOCAB)
    out, target = next_token(logits, ids, mask)
    assert target.tolist() == [6, 7, 8, 4]
    assert torch.equal(out, torch.stack([logits[:, 0, 0], logits[:, 0, 1], logits[:, 0, 2],
                                         logits[:, 1, 2]], dim=1))  # fmt: skip
    assert next_token(logits, ids)[1].numel() == 6
    with pytest.raises(ValueError, match=r"\(S, B, T, vocab\)"):
        next_token(logits[0], ids)


def test_merging_the_adapter_merges_the_posterior_mean():
    model = _tiny_lm(init_lora_weights=False)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    want = layer.base_layer.weight + layer.scaling["default"] * (
        layer.lora_B["default"].weight @ layer.lora_A["default"].weight_mu
    )
    merged = model.merge_and_unload()
    torch.testing.assert_close(
        merged.model.layers[0].self_attn.q_proj.weight, want.detach(), rtol=1.3e-6, atol=1e-6
    )
