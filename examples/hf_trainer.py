"""Scion under the Hugging Face Trainer: a tiny Llama from a config (no download), synthetic data.

    python examples/hf_trainer.py --steps 40 --out /tmp/hf-scion
    python examples/hf_trainer.py --steps 80 --out /tmp/hf-scion --resume   # continues from the last checkpoint

The recipe is three lines: groups from ``dk.param_groups`` (the paper's norms and per-layer learning
rates, by parameter name), ``dk.Scion`` over them, and ``optimizers=(optimizer, scheduler)``. The
Trainer calls ``optimizer.step()`` without a closure, then ``model.zero_grad()``; its checkpoints hold
``optimizer.state_dict()`` (loaded back with ``weights_only=True``, which Scion's state passes) and
``trainer.train(resume_from_checkpoint=...)`` continues exactly where the run stopped.

Use ``Scion`` here, not ``ScionLight`` with momentum < 1: the Trainer zeroes gradients after every step
(``model.zero_grad()``), which would wipe the momentum that ScionLight keeps in ``p.grad``.
"""
from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, get_constant_schedule

import disco_kernels as dk

VOCAB, SEQ = 64, 32


class Progressions(torch.utils.data.Dataset):
    """Token sequences (a + b·t) mod VOCAB: learnable next-token prediction, fixed by the seed."""

    def __init__(self, n: int = 256, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        a = torch.randint(VOCAB, (n, 1), generator=gen)
        b = torch.randint(1, 4, (n, 1), generator=gen)
        self.tokens = (a + b * torch.arange(SEQ)) % VOCAB

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}  # the model shifts labels itself


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(cfg)


def make_trainer(out: str, steps: int, *, lr: float = 2 ** -4, momentum: float = 1.0, save_steps: int = 0,
                 batch: int = 16, seed: int = 0, light: bool = False) -> Trainer:
    model = tiny_llama(seed)
    groups = dk.param_groups(model, lr=lr)  # input / hidden / output / vector groups, lr 1 : 1/8 : 1 : 1/8
    opt_cls = dk.ScionLight if light else dk.Scion
    optimizer = opt_cls(groups, momentum=momentum, unconstrained=True)  # the paper: unconstrained, constant lr
    args = TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=batch, seed=seed,
        logging_steps=1, report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        max_grad_norm=0.0,  # no clipping: the LMO ignores the gradient's scale (clipping only reweights momentum)
        use_cpu=not torch.cuda.is_available())
    return Trainer(model=model, args=args, train_dataset=Progressions(seed=seed),
                   optimizers=(optimizer, get_constant_schedule(optimizer)))


def losses(trainer: Trainer) -> list[float]:
    return [r["loss"] for r in trainer.state.log_history if "loss" in r]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default="/tmp/hf-scion")
    ap.add_argument("--lr", type=float, default=2 ** -4)
    ap.add_argument("--momentum", type=float, default=1.0, help="Scion's (1 - usual factor); 1.0: none (the paper)")
    ap.add_argument("--save-steps", type=int, default=20)
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    args = ap.parse_args()
    trainer = make_trainer(args.out, args.steps, lr=args.lr, momentum=args.momentum, save_steps=args.save_steps)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    ls = losses(trainer)
    print(f"steps {trainer.state.global_step}  loss {ls[0]:.3f} -> {ls[-1]:.3f}")


if __name__ == "__main__":
    main()
