"""Scion (or ScionLight) under PyTorch Lightning: the package's norm-everywhere LM, synthetic data.

    python examples/lightning_trainer.py --epochs 3
    python examples/lightning_trainer.py --epochs 3 --light --momentum 0.1    # ScionLight: momentum kept in p.grad
    python examples/lightning_trainer.py --epochs 1 --save /tmp/pl.ckpt && \\
        python examples/lightning_trainer.py --epochs 3 --resume /tmp/pl.ckpt   # continues exactly

``configure_optimizers`` returns the optimizer over ``dk.param_groups`` (the paper's norms and per-layer
learning rates). Lightning calls ``optimizer.step(closure)`` (Scion runs the closure: forward, zero_grad,
backward) and saves ``optimizer.state_dict()`` in its checkpoints.

ScionLight keeps its momentum in ``p.grad``, and Lightning zeroes gradients twice: ``optimizer.zero_grad()``
before every backward (the ``optimizer_zero_grad`` hook) and ``module.zero_grad()`` when ``fit`` starts,
after restoring a checkpoint. A LightningModule that trains with ScionLight overrides both to keep them,
as ``ScionModule`` does below. Without the first, ScionLight warns once and each step sees only the new
gradient; without the second, a resumed run silently drops the momentum it saved (one step's worth).

Resuming is exact from a checkpoint taken at the end of an epoch (as here, or ModelCheckpoint's default):
mid-epoch, Lightning restarts a plain DataLoader from its first batch (it warns so) unless the loader
is resumable (``state_dict`` / ``load_state_dict``, e.g. torchdata's StatefulDataLoader).
"""
from __future__ import annotations

import argparse

import lightning as L
import torch

import disco_kernels as dk
from disco_kernels.models import ModelConfig, NormEverywhereLM

VOCAB, SEQ = 64, 32
CONFIG = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, max_seq_len=SEQ)


def progressions(n: int = 256, seed: int = 0) -> torch.utils.data.TensorDataset:
    """(inputs, targets) of token sequences (a + b·t) mod VOCAB: learnable next-token prediction."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(VOCAB, (n, 1), generator=gen)
    b = torch.randint(1, 4, (n, 1), generator=gen)
    tokens = (a + b * torch.arange(SEQ + 1)) % VOCAB
    return torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])


def loader(batch: int = 16, n: int = 256, seed: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(progressions(n, seed), batch_size=batch, shuffle=False)


class ScionModule(L.LightningModule):
    def __init__(self, lr: float = 2 ** -4, momentum: float = 1.0, light: bool = False, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.model = NormEverywhereLM(CONFIG)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.model(*batch)
        self.losses.append(loss.item())
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        groups = dk.param_groups(self.model, lr=self.hparams.lr)
        cls = dk.ScionLight if self.hparams.light else dk.Scion
        return cls(groups, momentum=self.hparams.momentum, unconstrained=True)

    # ScionLight's momentum lives in p.grad: keep it, both per step and when fit starts (after a restore)
    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        if not self.hparams.light:
            optimizer.zero_grad()

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not self.hparams.light:
            super().zero_grad(set_to_none)


def make_trainer(epochs: int, **kwargs) -> L.Trainer:
    defaults = dict(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                    enable_model_summary=False, enable_progress_bar=False)
    return L.Trainer(max_epochs=epochs, **{**defaults, **kwargs})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2 ** -4)
    ap.add_argument("--momentum", type=float, default=1.0, help="Scion's (1 - usual factor); 1.0: none (the paper)")
    ap.add_argument("--light", action="store_true", help="ScionLight (momentum in p.grad)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--save", help="write a Lightning checkpoint here at the end")
    ap.add_argument("--resume", help="continue from such a checkpoint")
    args = ap.parse_args()
    module = ScionModule(lr=args.lr, momentum=args.momentum, light=args.light)
    trainer = make_trainer(args.epochs)
    trainer.fit(module, loader(args.batch), ckpt_path=args.resume)
    if args.save:
        trainer.save_checkpoint(args.save)
    print(f"steps {trainer.global_step}  loss {module.losses[0]:.3f} -> {module.losses[-1]:.3f}")


if __name__ == "__main__":
    main()
