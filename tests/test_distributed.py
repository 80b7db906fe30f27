"""Distributed fine-tuning: two gloo processes under torchrun against one process with the same global batch.

One torchrun launch (``python -m torch.distributed.run --standalone``, a free port chosen by the
rendezvous, a hard timeout) runs :func:`_worker` on two ranks; each rank saves what it ended with,
and the tests compare the ranks with each other and with single-process runs made here. Equality
with one process needs the same data order, augmentation and attack: the loader shards one shared
permutation and augments each rank's rows as one process would, the attack starts from the clean
input (random starts are drawn per rank), and the model has no batch norm (DDP normalises with each
rank's own batch statistics).
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

import cstar_fx
from cstar_fx.data import TensorData, digits
from cstar_fx.models import small_cnn
from cstar_fx.robust import (Admm, AdmmConfig, AttackConfig, JointConfig, LossConfig, TrainConfig, cstar, evaluate,
                             finetune, load_checkpoint)
from cstar_fx.robust.admm import TrainHook
from cstar_fx.robust.distributed import World, init_from_env, process_group, world

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 240
ATTACK = AttackConfig(eps=0.1, alpha=0.04, steps=3, random_start=False)
CFG = TrainConfig(epochs=3, batch_size=64, lr=0.05, seed=1, progress=False, loss=LossConfig("pgd", attack=ATTACK))
JOINT = CFG.replace(epochs=2)
ADMM = AdmmConfig(rho=0.05, refresh_every=3, replan=True)
EVAL = AttackConfig(eps=0.1, alpha=0.03, steps=3, random_start=False)


def _net() -> nn.Module:
    """No batch norm: DDP would normalise each rank's half batch with its own statistics."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def _data() -> tuple[TensorData, TensorData]:
    train, test = digits()
    train = train.subset(256)
    return TensorData(train.x, train.y, classes=train.classes, augment="crop_flip", pad=1), test.subset(90)


def _joint_hook(model: nn.Module) -> Admm:
    return Admm(model, cstar_fx.plan_ranks(model, ratio=2), ADMM)


def _admm_state(admm: Admm) -> dict[str, Any]:
    return {"Z": dict(admm.Z), "U": dict(admm.U), "rho": admm.rho, "plan": admm.plan.to_json(),
            "history": [r.to_dict() for r in admm.history]}


class _StopAt(TrainHook):
    """Raise on every rank after the same optimiser step, like a job stopped mid-epoch."""

    def __init__(self, step: int) -> None:
        self.step, self.seen = step, 0

    def after_step(self) -> None:
        self.seen += 1
        if self.seen == self.step:
            raise KeyboardInterrupt


def _worker(out: Path) -> None:
    """Runs on every rank under torchrun; saves ``out/rank<r>.pt``."""
    ft = importlib.import_module("cstar_fx.robust.finetune")  # the package re-exports the function under this name

    saves: list[str] = []
    real_save = ft.atomic_save

    def counting_save(obj: Any, path: Any) -> None:
        saves.append(str(path))
        real_save(obj, path)

    ft.atomic_save = counting_save  # type: ignore[assignment]
    torch.set_num_threads(1)
    with process_group(timeout_s=120) as w:
        assert w.size == 2, w
        train, test = _data()
        res: dict[str, Any] = {"world": (w.rank, w.size)}

        model = _net()
        hist = finetune(model, train, CFG, run_dir=out / "plain")
        res["plain"] = {"state": model.state_dict(), "history": hist.epochs}
        res["plain_saves"] = list(saves)

        stopped = _net()
        try:
            finetune(stopped, train, CFG, run_dir=out / "resumed", hook=_StopAt(4 + 2))  # 4 steps per epoch
        except KeyboardInterrupt:
            res["stopped_after"] = load_checkpoint(out / "resumed")["epoch"]
        resumed = _net()
        hist = finetune(resumed, train, CFG, run_dir=out / "resumed", resume=True)
        res["resumed"] = {"state": resumed.state_dict(), "from": hist.resumed_from}

        dense = _net()
        admm = _joint_hook(dense)
        hist = finetune(dense, train, JOINT, hook=admm)
        res["joint"] = {"state": dense.state_dict(), "admm": _admm_state(admm), "history": hist.epochs}

        quick = TrainConfig(epochs=1, batch_size=32, lr=0.01, progress=False,
                            loss=LossConfig("trades", attack=AttackConfig(eps=0.1, alpha=0.04, steps=2)))
        torch.manual_seed(w.rank)  # different initial weights per rank: DDP must start every rank from rank 0's
        before = len(saves)
        gm = cstar(small_cnn(width=16), train, 2, JointConfig(joint=quick, finetune=quick.replace(loss=LossConfig("fast"))),
                   run_dir=out / "cstar")
        res["cstar"] = {"state": gm.state_dict(), "ratio": cstar_fx.get_report(gm).ratio_params,
                        "saves": saves[before:]}

        r = evaluate(model, test, attack=EVAL, sanity_n=40, progress=False)
        res["evaluate"] = {"clean": r.clean, "robust": r.robust, "n": r.n, "sanity": r.sanity.to_dict()}
    torch.save(res, out / f"rank{w.rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__).resolve()), str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=out,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers: a hang fails instead of blocking CI
        log, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {LAUNCH_TIMEOUT_S} s:\n{log[-4000:]}")
    assert proc.returncode == 0, log[-6000:]
    loaded = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return loaded[0], loaded[1], out


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    train, test = _data()
    model = _net()
    plain = finetune(model, train, CFG)
    dense = _net()
    admm = _joint_hook(dense)
    finetune(dense, train, JOINT, hook=admm)
    r = evaluate(model, test, attack=EVAL, sanity=False, progress=False)
    return {"plain": model.state_dict(), "plain_history": plain.epochs, "joint": dense.state_dict(),
            "admm": _admm_state(admm), "clean": r.clean, "robust": r.robust}


def _ranks(plan_json: str) -> dict[str, tuple[int, ...]]:
    return {name: lp.ranks for name, lp in cstar_fx.RankPlan.from_json(plan_json).layers.items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=k)


def test_two_ranks_train_like_one_process_with_the_same_global_batch(ranks, single) -> None:
    r0, r1, out = ranks
    assert (r0["world"], r1["world"]) == ((0, 2), (1, 2))  # both ranks finished and saved
    _assert_same(r0["plain"]["state"], r1["plain"]["state"])  # DDP kept the replicas identical
    _assert_close(r0["plain"]["state"], single["plain"])
    moved = max(float((v - _net().state_dict()[k]).abs().max()) for k, v in single["plain"].items())
    assert moved > 1e-2  # the comparison is not between two untrained models
    for dist_epoch, one in zip(r0["plain"]["history"], single["plain_history"], strict=True):
        assert dist_epoch["loss"] == pytest.approx(one["loss"], rel=1e-4)  # all-reduced over both halves
        assert dist_epoch["acc"] == pytest.approx(one["acc"], abs=1e-9)
    untimed = [[{k: v for k, v in e.items() if k != "seconds"} for e in r["plain"]["history"]] for r in (r0, r1)]
    assert untimed[0] == untimed[1]


def test_only_rank_0_writes_the_checkpoint(ranks) -> None:
    r0, r1, out = ranks
    assert r0["plain_saves"] == [str(out / "plain" / "checkpoint.pt")] * CFG.epochs
    assert r1["plain_saves"] == [] and r1["cstar"]["saves"] == []
    assert len(r0["cstar"]["saves"]) == 2  # joint and finetune phases, one epoch each
    ckpt = load_checkpoint(out / "plain")
    assert ckpt["epoch"] == CFG.epochs
    _assert_same(ckpt["model"], r0["plain"]["state"])
    assert sorted(p.name for p in (out / "plain").iterdir()) == ["checkpoint.pt"]  # no stray temporary files


def test_resume_under_ddp_continues_the_interrupted_run(ranks) -> None:
    r0, r1, _ = ranks
    assert r0["stopped_after"] == r1["stopped_after"] == 1  # stopped in epoch 2, after its first checkpoint
    assert r0["resumed"]["from"] == r1["resumed"]["from"] == 1
    _assert_same(r0["resumed"]["state"], r1["resumed"]["state"])
    _assert_same(r0["resumed"]["state"], r0["plain"]["state"])  # as if it had never stopped


def test_admm_state_is_identical_on_both_ranks_and_matches_one_process(ranks, single) -> None:
    r0, r1, _ = ranks
    a0, a1 = r0["joint"]["admm"], r1["joint"]["admm"]
    _assert_same(r0["joint"]["state"], r1["joint"]["state"])
    _assert_same(a0["Z"], a1["Z"])
    _assert_same(a0["U"], a1["U"])
    assert (a0["rho"], a0["plan"], a0["history"]) == (a1["rho"], a1["plan"], a1["history"])
    assert len(a0["history"]) == 1 + JOINT.epochs * 4 // ADMM.refresh_every  # refreshed on every 3rd step
    assert _ranks(a0["plan"]) == _ranks(single["admm"]["plan"]) and a0["rho"] == pytest.approx(single["admm"]["rho"])
    _assert_close(r0["joint"]["state"], single["joint"])
    _assert_close(a0["Z"], single["admm"]["Z"])
    _assert_close(a0["U"], single["admm"]["U"])


def test_cstar_under_two_ranks_builds_the_same_network_on_each(ranks) -> None:
    r0, r1, _ = ranks
    _assert_same(r0["cstar"]["state"], r1["cstar"]["state"])  # although rank 1 started from other weights
    assert r0["cstar"]["ratio"] == r1["cstar"]["ratio"] >= 1.9


def test_sharded_evaluation_sums_both_halves(ranks, single) -> None:
    r0, r1, _ = ranks
    assert r0["evaluate"] == r1["evaluate"]
    e = r0["evaluate"]
    assert e["n"] == 90
    assert e["clean"] == single["clean"]
    assert e["robust"] == single["robust"]  # deterministic attack: per-example results do not depend on the shard
    assert e["sanity"]["n"] == 40 and e["sanity"]["checks"]


def test_cli_compress_under_torchrun_writes_one_run_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "cstar_fx",
           "compress", "--limit", "64", "--teacher-epochs", "1", "--joint-epochs", "1", "--finetune-epochs", "1",
           "--methods", "decompose", "--ratios", "2", "--train-steps", "1", "--eval-steps", "2", "--eval-n", "32",
           "--batch-size", "32", "--no-export", "--out", str(run)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=LAUNCH_TIMEOUT_S,
                          start_new_session=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert (run / "COMPLETE").is_file() and (run / "results.json").is_file()
    assert proc.stdout.count("[cstar-fx] teacher") == 1  # one rank logs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no second run folder from rank 1
    odd = subprocess.run([*cmd[:-2], "--batch-size", "33", "--out", str(tmp_path / "odd")], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=LAUNCH_TIMEOUT_S, start_new_session=True)
    assert odd.returncode != 0 and "divisible by 2" in odd.stdout + odd.stderr


def test_outside_torchrun_everything_is_one_process() -> None:
    assert init_from_env() == World(0, 1, 0) == world()
    with process_group() as w:
        assert not w.active and w.is_main
    with pytest.raises(RuntimeError, match="torchrun"):
        world(enabled=True)


def test_a_shard_is_its_rows_of_the_global_batch() -> None:
    train, _ = _data()
    single = train.loader(64, train=True, seed=5)
    shards = [train.loader(64, train=True, seed=5, shard=(r, 2)) for r in (0, 1)]
    for loader in (single, *shards):
        loader.set_epoch(2)
    for (x, y), (x0, y0), (x1, y1) in zip(single, *shards, strict=True):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))
    with pytest.raises(ValueError, match="divisible by 2"):
        train.loader(63, train=True, shard=(0, 2))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
