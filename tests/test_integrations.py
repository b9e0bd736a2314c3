"""Framework integrations: the Hugging Face Trainer and Lightning examples' core, in process, and the
torchtitan optimizer container (skipped without torchtitan). Each framework's tests skip without it."""
from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import disco_kernels as dk

ROOT = Path(__file__).resolve().parents[1]


def _example(name: str):
    """Import examples/<name>.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), f"{n} differs by {(a[n] - b[n]).abs().max().item():.3g}"


def _assert_differ(a: dict, b: dict):
    assert any(not torch.equal(a[n], b[n]) for n in a), "expected a different run, got the same parameters"


def test_importing_the_package_imports_no_framework():
    code = ("import sys, disco_kernels, disco_kernels.integrations; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torchtitan', 'lightning', 'transformers'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


# -- Hugging Face Trainer ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import transformers
    transformers.logging.set_verbosity_error()
    return _example("hf_trainer")


def test_hf_trainer_trains_and_resumes_exactly(hf, tmp_path):
    """Scion under transformers.Trainer: the loss falls, the checkpoint holds Scion's momentum, and
    train(resume_from_checkpoint=...) ends on the uninterrupted run's parameters, bit for bit."""
    steps, half = 8, 4
    whole = hf.make_trainer(str(tmp_path / "whole"), steps, momentum=0.5, save_steps=half, batch=8)
    whole.train()
    losses = hf.losses(whole)
    assert len(losses) == steps and losses[-1] < 0.9 * losses[0], losses
    opt = whole.optimizer.optimizer if hasattr(whole.optimizer, "optimizer") else whole.optimizer  # accelerate wraps
    assert isinstance(opt, dk.Scion) and len(opt.state) == sum(len(g["params"]) for g in opt.param_groups)
    saved = torch.load(tmp_path / "whole" / f"checkpoint-{half}" / "optimizer.pt", weights_only=True)
    assert all("momentum_buffer" in s for s in saved["state"].values()) and saved["state"]

    resumed = hf.make_trainer(str(tmp_path / "resumed"), steps, momentum=0.5, batch=8)
    with torch.no_grad():  # the checkpoint's weights, not these, must count
        for p in resumed.model.parameters():
            p.add_(1.0)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / f"checkpoint-{half}"))
    assert resumed.state.global_step == steps
    _assert_same(_params(whole.model), _params(resumed.model))
    assert hf.losses(resumed)[half:] == losses[half:]


# -- Lightning ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pl():
    pytest.importorskip("lightning")
    import logging
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    return _example("lightning_trainer")


def _fit(pl, tmp_path, epochs, module=None, *, light=False, resume=None, save=None, **kwargs):
    module = module or pl.ScionModule(momentum=0.5, light=light)
    trainer = pl.make_trainer(epochs, default_root_dir=str(tmp_path), accelerator="cpu")  # as the plain loop
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|LeafSpec|treespec).*")
        trainer.fit(module, pl.loader(8, 32), ckpt_path=resume)
    if save:
        trainer.save_checkpoint(save)
    return module


def _plain_loop(pl, steps, *, light):
    """The same model, data and optimizer as ScionModule, in a plain loop (ScionLight: never zeroed)."""
    torch.manual_seed(0)
    model = pl.NormEverywhereLM(pl.CONFIG)
    opt = (dk.ScionLight if light else dk.Scion)(dk.param_groups(model, lr=2 ** -4), momentum=0.5,
                                                 unconstrained=True)
    batches = list(pl.loader(8, 32))
    for step in range(steps):
        model(*batches[step % len(batches)]).backward()
        opt.step()
        if not light:
            opt.zero_grad()
    return _params(model)


@pytest.mark.parametrize("light", [False, True], ids=["Scion", "ScionLight"])
def test_lightning_equals_plain_loop_and_resumes_exactly(pl, tmp_path, light):
    """Lightning (which steps with a closure) gives the plain loop's parameters bit for bit, for ScionLight
    too (with the example's zero_grad overrides); resuming from an epoch-end checkpoint gives the
    uninterrupted run's."""
    whole = _fit(pl, tmp_path, 2, light=light)
    assert len(whole.losses) == 8 and whole.losses[-1] < 0.9 * whole.losses[0], whole.losses
    _assert_same(_params(whole.model), _plain_loop(pl, 8, light=light))

    ckpt = str(tmp_path / "epoch1.ckpt")
    _fit(pl, tmp_path, 1, light=light, save=ckpt)
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]["state"]
    assert saved and all(("grad_state" if light else "momentum_buffer") in s for s in saved.values())
    resumed = _fit(pl, tmp_path, 2, light=light, resume=ckpt)
    assert len(resumed.losses) == 4
    _assert_same(_params(whole.model), _params(resumed.model))


def test_lightning_default_zero_grad_wipes_scionlight_momentum_and_warns(pl, tmp_path):
    """Without the overrides, Lightning zeroes ScionLight's carried gradient each step: ScionLight says so
    (once), and the run is not the plain loop's."""
    import lightning as L

    class Default(pl.ScionModule):
        optimizer_zero_grad = L.LightningModule.optimizer_zero_grad
        zero_grad = nn.Module.zero_grad

    with pytest.warns(UserWarning, match="wipes the momentum") as record:
        module = _fit(pl, tmp_path, 1, Default(momentum=0.5, light=True))
    assert sum("wipes the momentum" in str(w.message) for w in record) == 1
    _assert_differ(_params(module.model), _plain_loop(pl, 4, light=True))


def test_scionlight_zero_grad_warns_only_when_it_drops_momentum():
    p = nn.Parameter(torch.randn(4, 6))
    for momentum, grad, warns in [(1.0, True, False), (0.5, False, False), (0.5, True, True)]:
        opt = dk.ScionLight([p], momentum=momentum)
        p.grad = torch.randn(4, 6) if grad else None
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            opt.zero_grad()
            opt.zero_grad(set_to_none=False)
        assert len([w for w in record if "wipes the momentum" in str(w.message)]) == int(warns), (momentum, grad)
        assert p.grad is None


# -- torchtitan ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tt():
    pytest.importorskip("torchtitan")
    from disco_kernels.integrations import torchtitan
    return torchtitan


class _LM(nn.Module):
    """Embedding, two activation-checkpointed MLP blocks (wrapper names in the FQNs), RMSNorm, output."""

    def __init__(self, vocab=64, d=32):
        super().__init__()
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        self.tok_embeddings = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(checkpoint_wrapper(nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(),
                                                                     nn.Linear(2 * d, d))) for _ in range(2))
        self.norm = nn.RMSNorm(d)
        self.output = nn.Linear(d, vocab, bias=False)

    def forward(self, x):
        h = self.tok_embeddings(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.output(self.norm(h))


def _lm(seed=0):
    torch.manual_seed(seed)
    return _LM()


def _tt_train(model, opts, scheds, steps, start=0):
    losses = []
    for step in range(start, start + steps):
        opts.zero_grad()
        gen = torch.Generator().manual_seed(step)
        tokens = (torch.randint(64, (4, 1), generator=gen) + 3 * torch.arange(17)) % 64
        loss = nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opts.step()
        scheds.step()
        losses.append(loss.item())
    return losses


def test_torchtitan_container_groups_by_canonical_name_and_resumes_through_dcp(tt, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torchtitan.components.optimizer import LRSchedulersContainer

    cfg = tt.ScionOptimizersContainer.Config(lr=2 ** -4, momentum=0.5)
    sched_cfg = LRSchedulersContainer.Config(warmup_steps=2, decay_ratio=0.5)
    model = _lm()
    opts = cfg.build(model_parts=[model])
    scheds = sched_cfg.build(optimizers=opts, training_steps=8)
    (opt,) = opts.optimizers
    assert isinstance(opt, dk.Scion)
    roles = {g["role"]: g["param_names"] for g in opt.param_groups}
    assert roles["input"] == ["tok_embeddings.weight"] and roles["output"] == ["output.weight"]
    assert roles["hidden"] == ["layers.0.0.weight", "layers.0.2.weight", "layers.1.0.weight", "layers.1.2.weight"]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2 ** -4 / 2, 2 ** -7 / 2, 2 ** -4 / 2, 2 ** -7 / 2])

    losses = _tt_train(model, opts, scheds, 4)
    assert "state.layers.1.2.weight.momentum_buffer" in opts.state_dict()
    dcp.save({"optimizer": opts}, checkpoint_id=str(tmp_path / "ckpt"))
    saved_model, saved_sched = copy.deepcopy(model.state_dict()), copy.deepcopy(scheds.state_dict())
    losses += _tt_train(model, opts, scheds, 4, 4)
    assert losses[-1] < 0.9 * losses[0], losses

    again = _lm(seed=1)
    again.load_state_dict(saved_model)
    opts2 = cfg.build(model_parts=[again])
    scheds2 = sched_cfg.build(optimizers=opts2, training_steps=8)
    dcp.load({"optimizer": opts2}, checkpoint_id=str(tmp_path / "ckpt"))
    scheds2.load_state_dict(saved_sched)
    assert _tt_train(again, opts2, scheds2, 4, 4) == losses[4:]
    _assert_same(_params(model), _params(again))


def test_torchtitan_regex_groups_know_scion(tt):
    from torchtitan.components.optimizer import LRSchedulersContainer, ParamGroupConfig

    cfg = tt.ScionOptimizersContainer.Config(implementation="for-loop", param_groups=[
        ParamGroupConfig(pattern=r"layers\..*weight$", optimizer_name="Scion",
                         optimizer_kwargs={"lr": 0.01, "norm": "Spectral", "momentum": 0.5}),
        ParamGroupConfig(pattern=r".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-3})])
    model = _lm()
    opts = cfg.build(model_parts=[model])
    scion, adamw = opts.optimizers
    assert isinstance(scion, dk.Scion) and isinstance(adamw, torch.optim.AdamW)
    assert scion.param_groups[0]["param_names"] == ["layers.0.0.weight", "layers.0.2.weight", "layers.1.0.weight",
                                                    "layers.1.2.weight"]
    assert "fused" not in scion.param_groups[0]
    _tt_train(model, opts, LRSchedulersContainer.Config(warmup_steps=0, decay_ratio=0.0).build(
        optimizers=opts, training_steps=2), 2)
    assert "state.layers.0.0.weight.momentum_buffer" in opts.state_dict()


def test_torchtitan_pipeline_parts(tt):
    """Model parts (pipeline stages): the output layer is named, a part without it has no output role."""
    model = _lm()
    first = nn.ModuleDict({"tok_embeddings": model.tok_embeddings, "layers": model.layers[:1]})
    last = nn.ModuleDict({"layers": model.layers[1:], "norm": model.norm, "output": model.output})
    with pytest.raises(ValueError, match="output="):
        tt.ScionOptimizersContainer.Config().build(model_parts=[first, last])
    with pytest.raises(ValueError, match="no model part"):
        tt.ScionOptimizersContainer.Config(output="output.weight", roles={"nope.weight": "hidden"}).build(
            model_parts=[first, last])
    opts = tt.ScionOptimizersContainer.Config(output="output.weight").build(model_parts=[first, last])
    roles = [{g["role"]: g["param_names"] for g in o.param_groups} for o in opts.optimizers]
    assert "output" not in roles[0] and roles[0]["hidden"] == ["layers.0.0.weight", "layers.0.2.weight"]
    assert roles[1]["output"] == ["output.weight"]


def test_torchtitan_example_config_on_llama3_debugmodel(tt):
    """examples/torchtitan_scion.py's configs build on torchtitan's own Llama-3 debug model."""
    example = _example("torchtitan_scion")
    config = example.llama3_debugmodel_scion()
    model = config.model_spec.model.build()
    opts = config.optimizer.build(model_parts=[model])
    groups = {g["role"]: g for g in opts.optimizers[0].param_groups}
    assert groups["input"]["param_names"] == ["tok_embeddings.weight"]
    assert len(groups["output"]["params"]) == 1 and groups["output"]["norm"] == "RowNorm"
    assert all(n.startswith("layers.") for n in groups["hidden"]["param_names"])
    assert {type(o).__name__ for o in example.llama3_debugmodel_scion_adamw_vectors().optimizer.build(
        model_parts=[model]).optimizers} == {"Scion", "AdamW"}
