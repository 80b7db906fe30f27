"""cstar_fx.save / cstar_fx.load: exact round trips, no pickle, atomic writes, and damaged files refused."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import cstar_fx
from cstar_fx.io import MODEL_FORMAT, CheckpointError, load, save

ROOT = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    """Module and functional layers, batch norm buffers, a residual, and a block that needs to be a leaf."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.body = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.gate = Gate(width)
        self.w = nn.Parameter(torch.randn(10, width) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = x + self.body(x)
        x = self.gate(x).mean((2, 3))
        return F.linear(x, self.w)


class Gate(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent: fx cannot trace this, so transform needs leaf_modules=("gate",)
            return x * torch.sigmoid(self.fc(x.mean((2, 3))))[:, :, None, None]
        return x


def _trained_gm(width: int = 32) -> tuple[Net, torch.fx.GraphModule]:
    model = Net(width)
    gm = cstar_fx.transform(model, 3, round_to=4, leaf_modules=("gate",))
    with torch.no_grad():  # stand-in for fine-tuning: every saved value differs from a fresh transform
        for t in gm.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.rand_like(t) * 0.01)
        gm.bn.num_batches_tracked.fill_(7)
    return model, gm.eval()


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_round_trip_is_exact_from_a_fresh_architecture(tmp_path):
    model, gm = _trained_gm()
    path = save(gm, tmp_path / "m.safetensors")
    assert path == tmp_path / "m.safetensors" and sorted(os.listdir(tmp_path)) == ["m.safetensors"]
    fresh = Net()  # different random weights: everything must come from the file
    fresh_state = {k: v.clone() for k, v in fresh.state_dict().items()}
    loaded = load(path, model=fresh).eval()  # leaf_modules=("gate",) comes from the file
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))
    assert loaded.state_dict().keys() == gm.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in gm.state_dict().items())
    assert cstar_fx.get_plan(loaded) == cstar_fx.get_plan(gm)
    assert cstar_fx.get_report(loaded) == cstar_fx.get_report(gm)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in fresh_state.items())  # model= is not modified


def test_file_is_plain_safetensors_with_plan_checksum_and_versions(tmp_path):
    _, gm = _trained_gm()
    path = save(gm, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == MODEL_FORMAT
    assert meta["cstar_fx_version"] == cstar_fx.__version__ and meta["torch_version"] == torch.__version__
    assert cstar_fx.RankPlan.from_json(meta["plan"]) == cstar_fx.get_plan(gm)
    options = json.loads(meta["options"])
    assert options["unpack_attention"] is False
    leaves = options["leaf_modules"]  # modules the graph calls opaquely, minus the factor layers
    assert "gate" in leaves and "bn" in leaves and not [n for n in leaves if n.endswith((".reduce", ".core", ".expand"))]
    assert len(meta["sha256"]) == 64 and int(meta["sha256"], 16) >= 0
    assert keys == set(gm.state_dict())


def test_load_never_unpickles(tmp_path, monkeypatch):
    _, gm = _trained_gm()
    path = save(gm, tmp_path / "m.safetensors")

    def forbidden(*args, **kwargs):
        raise AssertionError("load must not unpickle anything")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert cstar_fx.get_plan(load(path, model=Net())) == cstar_fx.get_plan(gm)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_file_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"weights": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a readable cstar_fx model file"):
        load(tmp_path / "evil.pt", model=Net())
    assert not (tmp_path / "pwned").exists()


def test_single_byte_corruption_anywhere_is_detected(tmp_path):
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    gm = cstar_fx.transform(model, 1.5, round_to=2)
    good = save(gm, tmp_path / "m.safetensors").read_bytes()
    bad = tmp_path / "bad.safetensors"
    # every other position, alternating masks: length prefix, header JSON (plan, checksum...), tensor bytes
    for i in range(0, len(good), 2):
        data = bytearray(good)
        data[i] ^= 0x01 if i % 4 else 0x80
        bad.write_bytes(bytes(data))
        with pytest.raises(CheckpointError):
            load(bad, model=model)
        assert bad.read_bytes() == bytes(data)  # load writes nothing


@pytest.mark.parametrize("keep", [0, 7, 8, 64, 0.5, -1])
def test_truncated_file_raises_and_changes_nothing(tmp_path, keep):
    _, gm = _trained_gm()
    good = save(gm, tmp_path / "m.safetensors").read_bytes()
    cut = int(len(good) * keep) if isinstance(keep, float) else (len(good) + keep if keep < 0 else keep)
    (tmp_path / "m.safetensors").write_bytes(good[:cut])
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="truncated, corrupted"):
        load(tmp_path / "m.safetensors", model=Net())
    assert _snapshot(tmp_path) == before


def test_plain_safetensors_and_newer_format_are_refused(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a cstar_fx model file"):
        load(tmp_path / "plain.safetensors", model=Net())
    save_file({"w": torch.zeros(2)}, str(tmp_path / "new.safetensors"),
              metadata={"format": "cstar-fx/model/99", "cstar_fx_version": "9.0"})
    with pytest.raises(CheckpointError, match=r"format 'cstar-fx/model/99'.*9\.0"):
        load(tmp_path / "new.safetensors", model=Net())


def test_mismatched_architecture_is_a_clear_error(tmp_path):
    _, gm = _trained_gm(width=32)
    path = save(gm, tmp_path / "m.safetensors")
    with pytest.raises(cstar_fx.PlanMismatchError, match="saved from a different architecture"):
        load(path, model=Net(width=16))
    other = Net()
    other.bn = nn.BatchNorm2d(32, affine=False)  # same factorized layers, different other weights
    with pytest.raises(cstar_fx.PlanMismatchError, match=r"missing in the file.*|not in the rebuilt model.*"):
        load(path, model=other)


def test_save_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    _, gm = _trained_gm()
    dest = tmp_path / "m.safetensors"
    dest.write_bytes(b"previous version")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save(gm, dest)
    assert _snapshot(tmp_path) == {"m.safetensors": b"previous version"}


def test_sigkill_during_save_never_leaves_a_half_file(tmp_path):
    dest = tmp_path / "m.safetensors"
    dest.write_bytes(b"previous version")
    script = textwrap.dedent(f"""
        import os, sys, time, torch.nn as nn, cstar_fx
        gm = cstar_fx.transform(nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256)), 2)
        def stall(src, dst):  # the temp file is complete and fsynced; die before the rename
            print("ready", flush=True)
            time.sleep(60)
        os.replace = stall
        cstar_fx.io.save(gm, {str(dest)!r})
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "ready"
        temps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert len(temps) == 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert dest.read_bytes() == b"previous version"  # the destination is the old file, never a partial one
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    assert cstar_fx.get_plan(load(temps[0], model=model)).factorized  # the temp was complete when the rename was due


def test_tied_weights_stay_tied_after_load(tmp_path):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.c(self.b(torch.relu(self.a(x))))

    model = Tied()
    gm = cstar_fx.transform(model, 1.2, round_to=4)
    assert set(cstar_fx.get_plan(gm).factorized) == {"c"} and "shared with" in cstar_fx.get_plan(gm).unsupported["a"]
    path = save(gm, tmp_path / "m.safetensors")
    loaded = load(path, model=Tied())
    assert loaded.a.weight is loaded.b.weight and torch.equal(loaded.a.weight, gm.a.weight)


def test_twice_transformed_model_loads_from_the_first_transform(tmp_path):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    plan1 = cstar_fx.plan_ranks(model, 1.5, round_to=4)
    gm2 = cstar_fx.transform(cstar_fx.transform(model, plan=plan1), 1.2, round_to=4)
    path = save(gm2, tmp_path / "m.safetensors")
    with pytest.raises(cstar_fx.PlanMismatchError, match="transformed twice"):
        load(path, model=model)
    loaded = load(path, model=cstar_fx.transform(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)),
                                                 plan=plan1))
    x = torch.randn(3, 64)
    assert torch.equal(loaded(x), gm2(x))


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def test_unpacked_attention_is_rebuilt_without_being_asked(tmp_path):
    model = _Attn().eval()
    gm = cstar_fx.transform(model, 1.5, round_to=4, unpack_attention=True)
    assert any(name.startswith("attn.") for name in cstar_fx.get_plan(gm).factorized)
    path = save(gm, tmp_path / "m.safetensors")
    loaded = load(path, model=_Attn().eval())  # unpack_attention=True comes from the file
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['round_to'\]"):
        load(path, model=model, round_to=4)
