"""The adversarial training loop: robustness gained, checkpoints, resume after a crash or a SIGKILL, early errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cstar_fx.data import TensorData, digits
from cstar_fx.models import small_cnn
from cstar_fx.robust import (AttackConfig, LossConfig, RunDirError, TrainConfig, evaluate, finetune,
                             load_checkpoint)

ATTACK = AttackConfig(eps=0.1, alpha=0.04, steps=3)
EVAL = AttackConfig(eps=0.1, alpha=0.02, steps=10)


def test_adversarial_training_beats_standard_training_under_pgd() -> None:
    train, test = digits()
    acc = {}
    for kind in ("clean", "pgd"):
        torch.manual_seed(0)
        model = small_cnn(width=16)
        finetune(model, train, TrainConfig(epochs=6, batch_size=64, lr=0.05, loss=LossConfig(kind, attack=ATTACK),
                                           progress=False))
        res = evaluate(model, test, attack=EVAL, sanity=False, progress=False)
        acc[kind] = (res.clean, res.pgd)
    assert acc["clean"][0] > 0.9  # both learned the task
    assert acc["pgd"][0] > 0.8
    assert acc["pgd"][1] >= acc["clean"][1] + 0.2, acc


def test_finetune_restores_mode_moves_nothing_global_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    model = small_cnn(width=4).eval()
    state = torch.random.get_rng_state()
    with caplog.at_level("INFO", logger="cstar_fx.robust"):
        hist = finetune(model, digits()[0].subset(128), TrainConfig(epochs=2, batch_size=32,
                                                                    loss=LossConfig("fast", attack=ATTACK), progress=False))
    lines = [r.getMessage() for r in caplog.records if r.name == "cstar_fx.robust.finetune"]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]  # one line per epoch, for log files
    assert f"loss {hist.epochs[1]['loss']:.4g}" in lines[1] and "acc " in lines[1] and "lr " in lines[1]
    assert not model.training
    assert torch.equal(torch.random.get_rng_state(), state)  # the loop used a private generator
    assert [e["epoch"] for e in hist.epochs] == [1, 2]
    assert hist.epochs[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine ends at zero
    assert all(set(e) >= {"loss", "acc", "seconds"} for e in hist.epochs)


def test_finetune_accepts_tensor_pairs_and_lists_of_batches() -> None:
    x, y = digits()[0].subset(64).tensors()
    cfg = TrainConfig(epochs=1, batch_size=32, loss=LossConfig("clean"), progress=False)
    assert len(finetune(small_cnn(width=4), (x, y), cfg).epochs) == 1
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    assert len(finetune(small_cnn(width=4), batches, cfg).epochs) == 1


def test_unwritable_run_dir_fails_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    model = small_cnn(width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RunDirError, match="writable run_dir"):
        finetune(model, digits()[0].subset(64), TrainConfig(epochs=1, progress=False), run_dir=blocker / "run")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Crash(Exception):
    pass


class _CrashingData:
    """Digits that raise after ``after`` batches in total, like a process dying mid-epoch."""

    def __init__(self, data: TensorData, after: int) -> None:
        self.data, self.after, self.count = data, after, 0

    def loader(self, batch_size: int, train: bool, device: object, *, seed: int = 0, sampler: object = None) -> object:
        inner = self.data.loader(batch_size, train, device, seed=seed)
        outer = self

        class Loader:
            def set_epoch(self, e: int) -> None:
                inner.set_epoch(e)

            def __len__(self) -> int:
                return len(inner)

            def __iter__(self):  # type: ignore[no-untyped-def]
                for batch in inner:
                    outer.count += 1
                    if outer.count > outer.after:
                        raise _Crash
                    yield batch

        return Loader()


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    data = digits()[0].subset(256)
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05, loss=LossConfig("fast", attack=ATTACK), progress=False)
    torch.manual_seed(0)
    reference = small_cnn(width=4)
    init = {k: v.clone() for k, v in reference.state_dict().items()}
    finetune(reference, data, cfg, run_dir=tmp_path / "ref")

    crashed = small_cnn(width=4)
    crashed.load_state_dict(init)
    with pytest.raises(_Crash):
        finetune(crashed, _CrashingData(data, after=4 * 2 + 1), cfg, run_dir=tmp_path / "run")  # dies in epoch 3
    assert load_checkpoint(tmp_path / "run")["epoch"] == 2
    resumed = small_cnn(width=4)
    resumed.load_state_dict(init)
    hist = finetune(resumed, data, cfg, run_dir=tmp_path / "run", resume=True)
    assert hist.resumed_from == 2 and [e["epoch"] for e in hist.epochs] == [1, 2, 3]
    for k, v in reference.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_resume_refuses_a_checkpoint_from_another_config(tmp_path: Path) -> None:
    data = digits()[0].subset(64)
    cfg = TrainConfig(epochs=1, batch_size=32, loss=LossConfig("clean"), progress=False)
    finetune(small_cnn(width=4), data, cfg, run_dir=tmp_path)
    with pytest.raises(ValueError, match="lr: 0.1 -> 0.05"):
        finetune(small_cnn(width=4), data, cfg.replace(lr=0.05), run_dir=tmp_path, resume=True)
    assert finetune(small_cnn(width=4), data, cfg.replace(progress=True), run_dir=tmp_path, resume=True).resumed_from == 1


_CHILD = textwrap.dedent("""
    import sys, torch
    from cstar_fx.data import digits
    from cstar_fx.models import small_cnn
    from cstar_fx.robust import TrainConfig, LossConfig, AttackConfig, finetune
    from cstar_fx.robust.admm import TrainHook

    class Report(TrainHook):
        def end_epoch(self, epoch):
            print(f"finished {epoch + 1}", flush=True)
            return {}

    torch.manual_seed(0)
    cfg = TrainConfig(epochs=EPOCHS, batch_size=32, lr=0.05, progress=False,
                      loss=LossConfig("pgd", attack=AttackConfig(eps=0.1, alpha=0.04, steps=3)))
    finetune(small_cnn(width=8), digits()[0].subset(512), cfg, run_dir=sys.argv[1], resume=True, hook=Report())
    print("complete", flush=True)
""")


def test_sigkilled_finetune_resumes_losing_at_most_one_epoch(tmp_path: Path) -> None:
    epochs = 8
    script = tmp_path / "child.py"
    script.write_text(_CHILD.replace("EPOCHS", str(epochs)))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, str(script), str(run)], stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ckpt = load_checkpoint(run) if (run / "checkpoint.pt").exists() else None
            if ckpt is not None and ckpt["epoch"] >= 2:
                break
            time.sleep(0.01)
        else:
            pytest.fail("the child never wrote its second checkpoint")
        time.sleep(0.05)  # now inside the next epoch
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert "complete" not in out
    finished = max(int(line.split()[1]) for line in out.splitlines() if line.startswith("finished"))
    saved = load_checkpoint(run)["epoch"]
    assert finished <= saved < epochs  # every finished epoch was checkpointed; only the one in flight is lost
    child2 = subprocess.run([sys.executable, str(script), str(run)], capture_output=True, text=True, env=env, timeout=120)
    assert child2.returncode == 0, child2.stderr
    resumed = [int(line.split()[1]) for line in child2.stdout.splitlines() if line.startswith("finished")]
    assert resumed == list(range(saved + 1, epochs + 1))  # continued right after the checkpoint
    final = load_checkpoint(run)
    assert final["epoch"] == epochs
    assert all(torch.isfinite(v).all() for v in final["model"].values() if v.is_floating_point())
    assert json.dumps(final["history"])  # plain numbers only
