import math

import pytest
import torch
from torch import nn

import disco_kernels as dk
from disco_kernels import norms
from disco_kernels.models import PRESETS, ModelConfig, NormEverywhereLM, rms_norm
from tolerances import elementwise_tol, reduction_tol


def test_presets():
    assert set(PRESETS) >= {"tiny", "proxy"}
    proxy = PRESETS["proxy"]
    assert (proxy.n_layers, proxy.dim, proxy.vocab_size, proxy.norm_eps) == (4, 256, 256, 1e-20)
    for name, cfg in PRESETS.items():
        assert NormEverywhereLM(name).cfg is cfg


def test_forward_shapes_and_initial_loss():
    model = NormEverywhereLM("tiny")
    tokens = torch.randint(0, 256, (3, 13))
    assert model(tokens).shape == (3, 13, 256)
    # logits = head(rms_norm(x)): rows of norm 1/sqrt(d) against inputs of norm sqrt(d) => |logit| <= 1,
    # so the loss is within 2 of ln(256)
    loss = model(tokens, torch.roll(tokens, 1, 1))
    assert loss.shape == () and abs(loss.item() - math.log(256)) <= 2
    assert model(tokens).abs().max() <= 1 + reduction_tol(torch.float32, 32)


def test_causal():
    model = NormEverywhereLM("tiny")
    a = torch.randint(0, 256, (2, 20))
    b = a.clone()
    b[:, 12:] = torch.randint(0, 256, (2, 8))
    la, lb = model(a), model(b)
    assert torch.allclose(la[:, :12], lb[:, :12], rtol=0, atol=elementwise_tol(torch.float32, 64))
    assert not torch.allclose(la[:, 12:], lb[:, 12:])


def test_init_has_the_papers_norms():
    cfg = ModelConfig(dim=64, n_layers=3, n_heads=2, max_seq_len=16)
    model = NormEverywhereLM(cfg)
    tol = reduction_tol(torch.float32, cfg.hidden_mlp_dim)
    rows = model.embed.weight.norm(dim=1)
    assert torch.allclose(rows, torch.full_like(rows, math.sqrt(64)), rtol=tol)  # each vocab row RMS 1
    assert abs(norms.l1_to_rms(model.embed.weight.T).item() - 1) <= tol
    assert abs(norms.rms_to_inf(model.head.weight).item() - 1) <= tol
    head_rows = model.head.weight.norm(dim=1)
    assert torch.allclose(head_rows, torch.full_like(head_rows, 1 / 8), rtol=tol)
    residual = set(model.residual_projections())
    assert len(residual) == 2 * 3
    for name, p in model.named_parameters():
        if not name.startswith("blocks."):
            continue
        want = 1 / math.sqrt(2 * 3) if name in residual else 1.0
        assert abs(norms.rms_to_rms(p).item() - want) <= tol * want, name
        s = torch.linalg.svdvals(p.detach().double())
        assert (s.max() - s.min()) / s.max() <= tol, name  # orthogonal up to scale


def test_norm_everywhere_every_linear_sees_rms_one_and_no_gains():
    model = NormEverywhereLM("tiny")
    assert all(p.dim() == 2 for p in model.parameters())  # parameter-free RMSNorm, no biases
    rms = []
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            mod.register_forward_pre_hook(lambda m, args: rms.append(args[0].pow(2).mean(-1).sqrt()))
    model(torch.randint(0, 256, (2, 9)))
    assert len(rms) == 7 * 2 + 1
    for r in rms:
        assert torch.allclose(r, torch.ones_like(r), rtol=elementwise_tol(torch.float32, 8))


def test_rms_norm():
    x = torch.randn(4, 33) * 1e-3
    y = rms_norm(x, 1e-20)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(4), rtol=elementwise_tol(torch.float32, 8))
    assert torch.equal(rms_norm(torch.zeros(2, 8), 1e-20), torch.zeros(2, 8))
    yb = rms_norm(x.bfloat16(), 1e-20)
    assert yb.dtype == torch.bfloat16 and torch.allclose(yb.float(), y, rtol=elementwise_tol(torch.bfloat16, 2))


def test_trains_with_scion():
    torch.manual_seed(3)
    model = NormEverywhereLM("tiny")
    opt = dk.Scion(dk.param_groups(model, lr=0.1), lr=0.1, unconstrained=True)
    x = torch.randint(0, 256, (4, 32))
    losses = []
    for _ in range(10):
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_bf16_forward_is_finite():
    model = NormEverywhereLM("tiny").to(torch.bfloat16)
    x = torch.randint(0, 256, (2, 16))
    assert torch.isfinite(model(x, x)).all()


@pytest.mark.parametrize("kwargs, field", [
    ({"dim": 30, "n_heads": 4}, "dim"),
    ({"dim": 36, "n_heads": 4}, "dim"),  # odd head size: no RoPE pairs
    ({"n_layers": 0}, "n_layers"),
    ({"vocab_size": 2.5}, "vocab_size"),
    ({"n_heads": True}, "n_heads"),
    ({"mlp_dim": -3}, "mlp_dim"),
    ({"norm_eps": 0.0}, "norm_eps"),
    ({"rope_theta": -1.0}, "rope_theta"),
])
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        ModelConfig(**kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="cfg must be .* 'huge'"):
        NormEverywhereLM("huge")
    with pytest.raises(TypeError, match="cfg"):
        NormEverywhereLM(3)
    model = NormEverywhereLM("tiny")
    with pytest.raises(ValueError, match=r"tokens must be \(batch, seq\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len 128"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))
