import csv
import json
import sys

import pytest
import torch

from disco_kernels import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["--quick", "--device", "cpu", "--batch-size", "4", "--seq-len", "32", "--monitor-every", "5"]


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_corpus_is_the_standard_library_as_bytes():
    data = train.load_corpus(1 << 17)
    assert data.dtype == torch.uint8 and data.numel() == 1 << 17
    assert torch.equal(data, train.load_corpus(1 << 17))  # deterministic
    text = bytes(data[:1 << 16].tolist())
    assert b"def " in text and b"import " in text


def test_batches_are_next_byte_pairs():
    data = torch.arange(200, dtype=torch.uint8)
    x, y = train.get_batch(data, 3, 10, torch.Generator().manual_seed(0), "cpu")
    assert x.shape == y.shape == (3, 10) and x.dtype == torch.long
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)


def test_demo_trains_and_writes_outputs(tmp_path, capsys):
    assert train.main(SMALL + ["--steps", "25", "--out", str(tmp_path), "--no-progress"]) == 0
    rows = read_csv(tmp_path / "train.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 26))
    assert int(rows[-1]["tokens"]) == 25 * 4 * 32
    losses = [float(r["loss"]) for r in rows]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0  # from ~ln(256) = 5.5 towards byte statistics
    norms = read_csv(tmp_path / "norms.csv")
    assert [int(r["step"]) for r in norms] == [5, 10, 15, 20, 25]
    log2_norms = [float(r["output/log2_rms_to_inf"]) for r in norms]
    assert log2_norms[-1] > log2_norms[0] > 0  # the output norm grows from its init value 1
    assert float(rows[-1]["log2_output_norm"]) == pytest.approx(log2_norms[-1])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 25 and summary["preset"] == "tiny" and 0 < summary["monitor_share"] < 1
    assert (tmp_path / "train.png").read_bytes()[:8] == PNG_MAGIC
    assert "loss" in capsys.readouterr().out


def test_progress_falls_back_to_prints_without_tqdm(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    assert train.main(SMALL + ["--steps", "4", "--out", str(tmp_path)]) == 0
    assert "step 4/4  loss" in capsys.readouterr().out


def test_sweep_writes_the_norm_transfer_picture(tmp_path):
    argv = ["--sweep", "--steps", "4", "--sweep-lrs", "0.05,0.2,0.4", "--sweep-batch-sizes", "2,4"]
    assert train.main(SMALL + argv + ["--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "sweep.csv")
    grid = {(b, lr) for b in (2, 4) for lr in (0.05, 0.2, 0.4)}
    assert {(int(r["batch_size"]), float(r["lr"])) for r in rows} == grid
    assert len(rows) == 6
    assert {int(r["tokens"]) for r in rows} == {4 * 4 * 32}  # same token budget for every batch size
    for bs in (2, 4):
        by_lr = sorted((float(r["lr"]), float(r["log2_output_norm"])) for r in rows if int(r["batch_size"]) == bs)
        assert [n for _, n in by_lr] == sorted(n for _, n in by_lr)  # larger lr, larger output norm
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG_MAGIC


def test_default_sweep_grid():
    args = train.parse_args(["--lr", "0.1", "--batch-size", "16", "--sweep"])
    assert args.sweep_lrs == [0.1 * f for f in train.SWEEP_LR_FACTORS]
    assert args.sweep_batch_sizes == [8, 16, 32]


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--lr", "-1"], ["--lr", "nan"], ["--preset", "huge"],
                                  ["--quick", "--seq-len", "4096"], ["--device", "tpu"],
                                  ["--sweep-lrs", "0.1,-2"], ["--sweep-batch-sizes", "a"]])
def test_bad_flags_exit(argv, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_batches_copy_to_the_device_without_waiting(monkeypatch):
    """A blocking host-to-device copy would synchronise the host with the GPU every step."""
    seen, to = [], torch.Tensor.to

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("non_blocking", False))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    train.get_batch(torch.arange(200, dtype=torch.uint8), 3, 10, torch.Generator().manual_seed(0), "cpu")
    assert seen == [True]


@pytest.mark.gpu
def test_batches_on_the_gpu_do_not_sync():
    data = torch.arange(200, dtype=torch.uint8)
    torch.cuda.set_sync_debug_mode("error")
    try:
        x, y = train.get_batch(data, 3, 10, torch.Generator().manual_seed(0), "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.is_cuda and torch.equal(y[:, :-1], x[:, 1:])
