import csv
import json
import math
import sys

import oracle
import pytest
import torch
from tolerances import assert_close

import disco_kernels as dk
from disco_kernels import scaling, train

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


def test_ctrl_c_ends_the_run_with_what_was_done(tmp_path, monkeypatch, capsys):
    real, calls = dk.Scion.step, []

    def step(self, *a, **k):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(self, *a, **k)
    monkeypatch.setattr(dk.Scion, "step", step)
    assert train.main(SMALL + ["--steps", "20", "--out", str(tmp_path), "--no-progress"]) == train.EXIT_INTERRUPTED
    assert [int(r["step"]) for r in read_csv(tmp_path / "train.csv")] == [1, 2, 3, 4, 5]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["interrupted"] and summary["steps"] == 5
    assert (tmp_path / "train.png").exists() and "interrupted after 5 steps" in capsys.readouterr().out


def test_rows_reach_the_csv_as_the_run_goes(tmp_path, monkeypatch):
    seen = []
    real = train.evaluate

    def evaluate(*a, **k):  # (runs after the last step, before the run returns)
        seen.append(len(read_csv(tmp_path / "train.csv")))
        return real(*a, **k)
    monkeypatch.setattr(train, "evaluate", evaluate)
    assert train.main(SMALL + ["--steps", "3", "--out", str(tmp_path), "--no-progress"]) == 0
    assert seen == [3]


def test_no_progress_still_prints_a_line_now_and_then(tmp_path, capsys):
    assert train.main(SMALL + ["--steps", "40", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "step 2/40  loss" in out and "step 40/40  loss" in out and out.count("/40  loss") == 20


def test_progress_falls_back_to_prints_without_tqdm(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    assert train.main(SMALL + ["--steps", "4", "--out", str(tmp_path)]) == 0
    assert "step 4/4  loss" in capsys.readouterr().out


def test_sweep_writes_the_norm_transfer_picture(tmp_path):
    """A real sweep, end to end in seconds: 2 budgets x 2 batch sizes x 2 lrs of the tiny model."""
    argv = ["--sweep", "--seq-len", "16", "--sweep-tokens", "2^9,2^10", "--sweep-lrs", "0.05,0.4",
            "--sweep-batch-sizes", "2,4", "--no-progress"]
    assert train.main(SMALL + argv + ["--out", str(tmp_path)]) == 0
    rows = train.read_sweep(tmp_path / "sweep.csv")
    grid = {(D, b, lr) for D in (512, 1024) for b in (2, 4) for lr in (0.05, 0.4)}
    assert {(r["tokens"], r["batch_size"], r["lr"]) for r in rows} == grid and len(rows) == 8
    assert all(r["steps"] == r["tokens"] // (r["batch_size"] * 16) and r["status"] == "ok" for r in rows)
    for D in (512, 1024):
        for bs in (2, 4):
            by_lr = sorted((r["lr"], r["log2_output_norm"]) for r in rows if (r["tokens"], r["batch_size"]) == (D, bs))
            assert [n for _, n in by_lr] == sorted(n for _, n in by_lr)  # larger lr, larger output norm
    assert all(r["log2:head.weight/rms_to_inf"] == r["log2_output_norm"] for r in rows)
    summary = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert [s["tokens"] for s in summary["sizes"]] == [512, 1024] and summary["setup"]["runs"] == 8
    for s in summary["sizes"]:
        best = min((r for r in rows if r["tokens"] == s["tokens"]), key=lambda r: r["val_loss"])
        assert s["best"] == {k: best[k] for k in ("lr", "batch_size", "val_loss", "log2_output_norm")}
    assert summary["exponents"]["batch_opt_vs_tokens"]["paper"] == 0.45
    assert len(summary["tuning_by_norm"]) == 2
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG_MAGIC


SWEEP_COLUMNS = ["preset", "seq_len", "seed", "tokens", "batch_size", "lr", "steps", "tokens_trained", "status",
                 "final_train_loss", "val_loss", "log2_output_norm"]
FAKE = ["--sweep", "--quick", "--seq-len", "16", "--sweep-tokens", "2^10,2^11", "--sweep-batch-sizes", "4,8",
        "--sweep-lrs", "0.125,0.25,0.5", "--no-progress"]


def fake_train(calls, diverge_at=math.inf, interrupt_at=None):
    """Stands in for train.train: a loss with its optimum at lr 1/4, a norm growing with lr and steps;
    lr >= ``diverge_at`` diverges at step 3; call number ``interrupt_at`` is interrupted (Ctrl-C)."""
    def run(preset, *, steps, lr, batch_size, **kwargs):
        calls.append((steps * batch_size * kwargs["seq_len"], batch_size, lr))
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        if lr >= diverge_at:
            raise train.Diverged(3, "loss is nan", lr)
        norm = math.log2(lr * steps)
        return {"summary": {"final_train_loss": 3.0, "val_loss": 2 + (math.log2(lr) + 2) ** 2 + 1 / steps,
                            "log2_output_norm": norm,
                            "layer_log2_norms": {"embed.weight/l1_to_rms": 0.5, "head.weight/rms_to_inf": norm}}}
    return run


def test_sweep_records_diverged_runs_and_goes_on(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train, "train", fake_train(calls, diverge_at=0.5))
    assert train.main(FAKE + ["--out", str(tmp_path)]) == 0
    with open(tmp_path / "sweep.csv") as f:
        header = next(csv.reader(f))
    assert header == SWEEP_COLUMNS + ["log2:embed.weight/l1_to_rms", "log2:head.weight/rms_to_inf", "seconds"]
    rows = train.read_sweep(tmp_path / "sweep.csv")
    assert [(r["tokens"], r["batch_size"], r["lr"]) for r in rows] == calls and len(rows) == 12
    diverged = [r for r in rows if r["lr"] == 0.5]
    assert len(diverged) == 4 and all(r["status"] == "diverged at step 3" for r in diverged)
    for r in diverged:  # recorded with NaN results, not dropped
        assert all(math.isnan(r[k]) for k in ("val_loss", "final_train_loss", "log2_output_norm",
                                               "log2:embed.weight/l1_to_rms"))
    assert rows[-1]["status"] == "diverged at step 3" and rows[-2]["status"] == "ok"  # runs after a divergence
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["steps"] == r["tokens"] // (r["batch_size"] * 16) == r["tokens_trained"] // (r["batch_size"] * 16)
               and r["val_loss"] == 2 + (math.log2(r["lr"]) + 2) ** 2 + 1 / r["steps"] for r in ok)
    summary = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert [s["diverged"] for s in summary["sizes"]] == [2, 2]
    assert [(s["best"]["lr"], s["best"]["batch_size"]) for s in summary["sizes"]] == [(0.25, 4), (0.25, 4)]


def test_resume_skips_the_runs_already_in_the_csv(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train, "train", fake_train(calls, interrupt_at=5))
    # interrupted during the 5th run: ends cleanly, the finished runs saved
    assert train.main(FAKE + ["--out", str(tmp_path)]) == train.EXIT_INTERRUPTED
    first = train.read_sweep(tmp_path / "sweep.csv")
    assert len(first) == 4 and not (tmp_path / "sweep_summary.json").exists()
    calls.clear()
    monkeypatch.setattr(train, "train", fake_train(calls))
    assert train.main(FAKE + ["--out", str(tmp_path), "--resume"]) == 0
    rows = train.read_sweep(tmp_path / "sweep.csv")
    assert len(calls) == 8 and rows[:4] == first  # the finished runs kept as they were
    assert sorted((r["tokens"], r["batch_size"], r["lr"]) for r in rows) == sorted(
        (D, b, lr) for D in (1024, 2048) for b in (4, 8) for lr in (0.125, 0.25, 0.5))
    calls.clear()
    assert train.main(FAKE + ["--out", str(tmp_path), "--resume"]) == 0  # nothing left: only the summary
    assert calls == [] and len(train.read_sweep(tmp_path / "sweep.csv")) == 12
    assert train.main(FAKE + ["--out", str(tmp_path), "--resume", "--sweep-lrs", "0.125,1.0"]) == 0
    assert calls == [(D, b, 1.0) for D in (1024, 2048) for b in (4, 8)]  # a grown grid runs only the new lr
    calls.clear()
    assert train.main(FAKE + ["--out", str(tmp_path)]) == 0  # without --resume the sweep starts over
    assert len(calls) == 12 and len(train.read_sweep(tmp_path / "sweep.csv")) == 12


def test_resume_does_not_take_runs_of_another_setup(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train, "train", fake_train(calls))
    assert train.main(FAKE + ["--out", str(tmp_path)]) == 0
    assert train.main(FAKE + ["--out", str(tmp_path), "--resume", "--seq-len", "32"]) == 0
    assert len(calls) == 24 and len(train.read_sweep(tmp_path / "sweep.csv")) == 24
    summary = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert summary["setup"]["seq_len"] == 32 and summary["setup"]["runs"] == 12  # the summary is of this setup
    assert [s["runs"] for s in summary["sizes"]] == [6, 6]


def test_sweep_progress_bar_covers_the_whole_grid(tmp_path, monkeypatch):
    bars = []
    real = train._progress
    monkeypatch.setattr(train, "_progress", lambda total, enabled: bars.append(total) or real(total, enabled))
    monkeypatch.setattr(train, "train", fake_train([]))
    assert train.main([a for a in FAKE if a != "--no-progress"] + ["--out", str(tmp_path)]) == 0
    assert bars == [sum(D // (b * 16) for D in (1024, 2048) for b in (4, 8)) * 3]  # every step of every run


def test_train_raises_diverged_at_the_first_non_finite_loss(monkeypatch):
    forward, calls = train.NormEverywhereLM.forward, []

    def nan_from_step_3(self, *args):
        calls.append(1)
        loss = forward(self, *args)
        return loss * math.nan if len(calls) >= 3 else loss

    monkeypatch.setattr(train.NormEverywhereLM, "forward", nan_from_step_3)
    with pytest.raises(train.Diverged, match="step 3: non-finite gradient") as e:
        train.train("tiny", steps=6, batch_size=2, seq_len=16, data=train.load_corpus(1 << 17), progress=False)
    assert e.value.step == 3 and isinstance(e.value, FloatingPointError)


def test_validation_takes_the_same_windows_whatever_the_batch_size(monkeypatch):
    forward, seen = train.NormEverywhereLM.forward, {}

    def spy(self, x, y):
        if not self.training:
            seen.setdefault(batch_size, []).append(x)
        return forward(self, x, y)

    monkeypatch.setattr(train.NormEverywhereLM, "forward", spy)
    data = train.load_corpus(1 << 17)
    for batch_size in (2, 5):
        train.train("tiny", steps=2, batch_size=batch_size, seq_len=16, data=data, progress=False)
    assert torch.equal(torch.cat(seen[2]), torch.cat(seen[5])) and torch.cat(seen[2]).shape == (train.EVAL_WINDOWS, 16)
    batch_size = "direct"
    train.evaluate(train.NormEverywhereLM(train.PRESETS["tiny"]), data, 16, "cpu", windows=40)  # a partial chunk
    assert [len(x) for x in seen["direct"]] == [32, 8]


def test_layer_norms_are_the_papers_norm_of_each_role():
    model = train.NormEverywhereLM(train.PRESETS["tiny"])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + torch.rand_like(p))  # away from the init's round values
    got = train.layer_log2_norms(model)
    params = dict(model.named_parameters())
    assert set(got) == {"embed.weight/l1_to_rms", "head.weight/rms_to_inf"} | {
        f"blocks.{b}.{n}.weight/rms_to_rms" for b in (0, 1) for n in ("q", "k", "v", "o", "gate", "up", "down")}
    for key, value in got.items():
        name, norm = key.split("/")
        W = params[name].detach()
        W, exact = (W.T, oracle.l1_to_rms(W.T)) if norm == "l1_to_rms" else (W, getattr(oracle, norm)(W))
        d_out, d_in = W.shape
        plain = {"l1_to_rms": lambda: W.float().norm(dim=0).max() / math.sqrt(d_out),
                 "rms_to_inf": lambda: math.sqrt(d_in) * W.float().norm(dim=1).max(),
                 "rms_to_rms": lambda: math.sqrt(d_in / d_out) * torch.linalg.matrix_norm(W.float(), 2)}[norm]()
        assert_close(torch.tensor(2.0 ** value, dtype=torch.float64), exact, plain, torch.float64, what=key)


@pytest.mark.parametrize("text, want", [("2^10,4096,1e4", [1024, 4096, 10000]), ("1x,2.5x", [512, 1280])])
def test_sweep_tokens_are_budgets_or_multiples_of_the_base_run(text, want):
    args = train.parse_args(["--sweep", "--steps", "8", "--batch-size", "4", "--seq-len", "16", "--sweep-tokens", text])
    assert args.sweep_tokens == want


def test_sweep_defaults_per_machine(monkeypatch):
    cpu = train.parse_args(["--sweep", "--device", "cpu"])
    assert (cpu.preset, cpu.seq_len, cpu.sweep_tokens) == ("tiny", 64, [2 ** 17, 2 ** 18, 2 ** 19])
    assert len(cpu.sweep_lrs) == 5 and cpu.sweep_batch_sizes == [8, 16, 32]
    gpu = train.parse_args(["--sweep", "--device", "cuda"])
    assert (gpu.preset, gpu.seq_len, gpu.sweep_tokens) == ("proxy", 256, [2 ** 22, 2 ** 23, 2 ** 24])
    plain = train.parse_args(["--device", "cpu"])
    assert (plain.preset, plain.steps, plain.batch_size, plain.seq_len, plain.lr) == ("proxy", 120, 16, 128, 2 ** -3)
    assert (plain.ns_dtype, train.parse_args(["--device", "cuda"]).steps) == ("auto", 300)
    mine = train.parse_args(["--sweep", "--preset", "small", "--seq-len", "32", "--device", "cuda"])
    assert (mine.preset, mine.seq_len) == ("small", 32)  # flags beat the defaults


def test_tune_by_norm_trains_at_the_predicted_lr(tmp_path):
    argv = SMALL + ["--steps", "8", "--seq-len", "16", "--tune-by-norm", "--tune-lrs", "0.1,0.4",
                    "--target-norm", "2.5", "--out", str(tmp_path), "--no-progress"]
    assert train.main(argv) == 0
    tune = json.loads((tmp_path / "tune.json").read_text())
    lrs, norms = [g["lr"] for g in tune["guesses"]], [g["log2_output_norm"] for g in tune["guesses"]]
    assert lrs == [0.1, 0.4] and tune["lr"] == scaling.lr_for_norm(lrs, norms, 2.5)
    assert tune["slope"] == scaling.norm_vs_lr_fit(lrs, norms)[0] > 0
    rows = read_csv(tmp_path / "train.csv")
    assert {float(r["lr"]) for r in rows} == {tune["lr"]} and len(rows) == 8  # the final run is the tuned one
    assert tune["result"]["log2_output_norm"] == json.loads((tmp_path / "summary.json").read_text())["log2_output_norm"]


def test_target_norm_from_a_sweep_summary(tmp_path):
    path = tmp_path / "sweep_summary.json"
    path.write_text(json.dumps({"optimal_log2_output_norm": {"at_lr_opt": {"mean": 5.25}}}))
    assert train.parse_args(["--tune-by-norm", "--target-norm", str(path)]).target_norm == 5.25
    assert train.parse_args(["--tune-by-norm", "--target-norm", "6.5"]).target_norm == 6.5
    assert train.parse_args(["--tune-by-norm"]).target_norm == scaling.OUTPUT_NORM_LOG2


def test_default_sweep_grid():
    args = train.parse_args(["--lr", "0.1", "--batch-size", "16", "--sweep"])
    assert args.sweep_lrs == [0.1 * f for f in train.SWEEP_LR_FACTORS]
    assert args.sweep_batch_sizes == [8, 16, 32]


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--lr", "-1"], ["--lr", "nan"], ["--preset", "huge"],
                                  ["--quick", "--seq-len", "4096"], ["--device", "tpu"],
                                  ["--sweep-lrs", "0.1,-2"], ["--sweep-batch-sizes", "a"],
                                  ["--sweep-tokens", "2^0.5"], ["--sweep-tokens", "0"], ["--sweep-tokens", "-1x"],
                                  ["--sweep-tokens", "lots"], ["--target-norm", "missing.json"],
                                  ["--sweep", "--tune-by-norm"], ["--tune-slope", "0"]])
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
