"""Bayesian LoRA (BLoB) on a Hugging Face causal LM, with the samples split over ranks.

    torchrun --nproc_per_node 2 examples/bayesian_lora.py
    python examples/bayesian_lora.py                          # one process, all samples

A tiny Llama is built from a config (random weights: nothing is downloaded), so that the
example runs anywhere on CPU in well under a minute; with a pretrained model
(``AutoModelForCausalLM.from_pretrained(...)``) the code is the same. peft adds LoRA
adapters to attention projections and to the output layer (a random base model's output
layer cannot express confident predictions); ``bayesianize_lora`` makes their A matrices
Bayesian (BLoB's choices: B deterministic, prior N(0, 0.2^2)). The model is fine-tuned on
"counting" sequences (each token is the previous one plus one, modulo the vocabulary) with
the ELBO; the S samples of a step are split over the ranks (``SampleParallel``: S/2 each on
2 ranks). At the end the full predictive (all S samples, gathered) scores the next token of
counting sequences and of random ones: its entropy (total uncertainty) and mutual
information (the epistemic part, the adapters' disagreement), through ``spar.metrics``.
Needs ``pip install 'spar[hf]'``.
"""

from __future__ import annotations

import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import spar
from spar.integrations.peft import CausalLM, bayesianize_lora, next_token

VOCAB, LENGTH = 32, 12
SAMPLES = 8
BATCH = 16  # sequences per step
STEPS = 100


def counting(n: int, gen: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, VOCAB, (n, 1), generator=gen)
    return (start + torch.arange(LENGTH)) % VOCAB


def main() -> None:
    torch.set_num_threads(1)
    grid = spar.distributed.init()  # sample axis = all ranks (or one local process)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LENGTH,
    )  # fmt: skip
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "lm_head"])
    model = CausalLM(bayesianize_lora(get_peft_model(LlamaForCausalLM(config), lora)))
    sp = spar.distributed.SampleParallel(model, SAMPLES, grid, fold_input=True, augment=None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    dataset_tokens = STEPS * BATCH * (LENGTH - 1)
    gen = torch.Generator().manual_seed(1)  # the same batches on every rank
    t0 = time.perf_counter()
    for step in range(STEPS):
        ids = counting(BATCH, gen)
        outputs, target = next_token(sp(ids), ids)  # (S_local, B*(T-1), V), (B*(T-1),)
        kl = spar.nn.kl_divergence(model)
        loss = spar.losses.elbo(outputs, target, kl=kl, dataset_size=dataset_tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if grid.rank == 0 and step % 50 == 0:
            print(f"step {step:>3}  loss {float(loss.detach()):.3f}")
    seconds = time.perf_counter() - t0

    test_gen = torch.Generator().manual_seed(2)
    report = {}
    for name, ids in (
        ("counting", counting(64, test_gen)),
        ("random", torch.randint(0, VOCAB, (64, LENGTH), generator=test_gen)),
    ):
        last = sp.predict(ids)[:, :, -1]  # (S, B, V): the next token after each sequence
        want = (ids[:, -1] + 1) % VOCAB
        report[name] = (
            float(spar.metrics.accuracy(last, want)),
            float(spar.metrics.predictive_entropy(last).mean()),
            float(spar.metrics.mutual_information(last).mean()),
        )
    if grid.rank == 0:
        print(f"{STEPS} steps, S={SAMPLES} on {grid.world_size} rank(s): {seconds:.1f} s")
        for name, (acc, entropy, mi) in report.items():
            print(
                f"{name:>8} sequences: next-token accuracy {acc:.2f}, predictive entropy "
                f"{entropy:.3f} nats, mutual information {mi:.4f} nats"
            )
    spar.distributed.shutdown()


if __name__ == "__main__":
    main()
