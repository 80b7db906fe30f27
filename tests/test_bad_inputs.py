"""Every row of the tables in docs/errors.md, run as a test: the docs are the test data, so they cannot drift.

A bad-input row's call must raise its error with its message and leave the files it could touch unchanged;
an allowed-input row's call must succeed and its check must hold.
"""

from __future__ import annotations

import builtins
import copy
import json
import re
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune

import cstar_fx
import cstar_fx.export
import cstar_fx.io
import cstar_fx.passes.trace
import cstar_fx.robust
from cstar_fx import CstarConfig, RankPlan, get_plan, get_report, load, plan_ranks, save, transform
from cstar_fx.export import export_onnx
from cstar_fx.passes.prune import prune_to_ratio
from cstar_fx.robust import AttackConfig, TrainConfig, evaluate, fgsm, finetune, pgd
from toy_nets import Leafy, ValueBranch

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
PUBLIC = ("transform", "plan_ranks", "RankPlan.from_json", "CstarConfig", "save", "load")


def _rows(table: str) -> list[list[str]]:
    text = DOC.read_text()
    match = re.search(rf"<!-- {table}:start -->\n(.*?)<!-- {table}:end -->", text, re.S)
    assert match, f"docs/errors.md has no {table} table"
    lines = [ln for ln in match.group(1).strip().splitlines()[2:]]  # skip header and separator
    rows = [[cell.strip() for cell in ln.strip().strip("|").split(" | ")] for ln in lines]
    assert rows and all(len(r) == 4 for r in rows), "every row needs 4 cells separated by ' | '"
    return rows


def _code(cell: str) -> str:
    assert cell.startswith("`") and cell.endswith("`"), f"expected a `code` cell, got {cell!r}"
    return cell[1:-1]


BAD = _rows("bad-inputs")
ALLOWED = _rows("allowed-inputs")


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(torch.relu(self.a(x))))


def _with_bad_value(model: nn.Module, value: float) -> nn.Module:
    bad = copy.deepcopy(model)
    with torch.no_grad():
        next(p for p in bad.parameters() if p.dim() == 2).view(-1)[3] = value
    return bad


def _pruned(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` with its first SVD pair one rank narrower than its plan says (what a pruner would do)."""
    gm = copy.deepcopy(gm)
    name, lp = next((n, lp) for n, lp in get_plan(gm).factorized.items() if lp.scheme == "svd")
    seq = gm.get_submodule(name)
    r = lp.ranks[0] - 1
    seq.reduce = nn.Linear(seq.reduce.in_features, r, bias=False)
    seq.expand = nn.Linear(r, seq.expand.out_features)
    return gm


class _Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.fc(x)


class _NoGrad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = self.a(x)
        return self.b(x)


class _ReadsDtype(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(x.to(self.fc.weight.dtype)))


class _ZeroWidth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 0), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.b(x), self.a(x)


class _DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.net(x)}


def _scaled(model: nn.Module, factor: float) -> nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.mul_(factor)
    return out


def _crafted(saved: Path, target: Path, change: Any) -> Path:
    """A copy of ``saved`` changed by ``change(meta, tensors)`` and given a valid checksum again: what a writer
    other than cstar_fx.save could produce, which the checksum (corruption, not tampering) cannot catch."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(saved), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    change(meta, tensors)
    meta["sha256"] = cstar_fx.io._digest(meta, tensors)
    save_file(tensors, str(target), metadata=meta)
    return target


@pytest.fixture(scope="module")
def names(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The objects the docs table refers to (described under "Names used in the table")."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("errors")
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    other_model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    plan = plan_ranks(model, 2)
    gm = transform(model, 2)
    meta_model = copy.deepcopy(model)
    meta_model[2].to("meta")
    saved = save(gm, tmp / "saved.safetensors")
    data = saved.read_bytes()
    (tmp / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[-5] ^= 0x10
    (tmp / "corrupted.safetensors").write_bytes(bytes(flipped))
    torch.save({"0.weight": torch.zeros(2)}, tmp / "pickle.pt")
    torch.save(model.state_dict(), tmp / "state.pt")
    (tmp / "junk.pt").write_text("not a checkpoint\n")
    from safetensors.torch import save_file

    save_file({"0.weight": torch.zeros(2)}, str(tmp / "plain.safetensors"))
    plan_dict = json.loads(plan.to_json())
    crafted = tmp_path_factory.mktemp("crafted")
    bad_header = _crafted(saved, crafted / "header.safetensors", lambda meta, t: meta.update(options="{"))
    nan_weights = _crafted(saved, crafted / "nan.safetensors", lambda meta, t: t["0.reduce.weight"].view(-1).__setitem__(
        0, float("nan")))
    bad_layout = _crafted(saved, crafted / "layout.safetensors", lambda meta, t: t.update(
        {"0.reduce.weight": t["0.reduce.weight"][:-1].clone()}))
    hooked, legacy_pruned, legacy_norm = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    hooked[0].register_forward_hook(lambda mod, inp, out: out * 2)
    torch.nn.utils.prune.l1_unstructured(legacy_pruned[0], "weight", 0.5)
    torch.nn.utils.spectral_norm(legacy_norm[0])
    dense_pruned_gm = transform(model, plan=plan.with_layer("2", scheme="dense"))
    dense_pruned_gm.get_submodule("").__setattr__("2", nn.Linear(64, 9))
    other_run = tmp_path_factory.mktemp("other_run")
    finetune(nn.Sequential(nn.Flatten(), nn.Linear(16, 5)), (torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 3])),
             TrainConfig(epochs=1, batch_size=4, progress=False), run_dir=other_run)

    def plan_json_with(**fields: Any) -> str:
        d = copy.deepcopy(plan_dict)
        d["layers"][0].update(fields)
        return json.dumps(d)

    def plan_json_without(key: str) -> str:
        return json.dumps({k: v for k, v in plan_dict.items() if k != key})

    return dict(
        torch=torch, nn=nn, numpy=numpy, transform=transform, plan_ranks=plan_ranks, RankPlan=RankPlan,
        CstarConfig=CstarConfig, save=save, load=load, get_plan=get_plan, get_report=get_report,
        model=model, x=torch.randn(2, 64), plan=plan, gm=gm, other_model=other_model,
        other_plan=plan_ranks(other_model, 2), bigger_model=nn.Sequential(*model, nn.BatchNorm1d(10)),
        nan_model=_with_bad_value(model, float("nan")), inf_model=_with_bad_value(model, float("inf")),
        nan_gm=_with_bad_value(gm, float("nan")), meta_model=meta_model,
        meta_only=copy.deepcopy(model).to("meta"), no_layers=nn.Sequential(nn.ReLU()), untraceable=ValueBranch(),
        tied=_Tied(), pruned_gm=_pruned(gm), plan_json_with=plan_json_with, plan_json_without=plan_json_without,
        tmp=tmp, saved=saved, truncated=tmp / "truncated.safetensors", corrupted=tmp / "corrupted.safetensors",
        pickle_file=tmp / "pickle.pt", plain_safetensors=tmp / "plain.safetensors", missing=tmp / "missing.safetensors",
        new_path=tmp / "new.safetensors", state_file=tmp / "state.pt", junk_file=tmp / "junk.pt",
        load_weights=cstar_fx.io.load_weights,
        pgd=pgd, fgsm=fgsm, evaluate=evaluate, finetune=finetune, AttackConfig=AttackConfig, TrainConfig=TrainConfig,
        export_onnx=export_onnx, prune_to_ratio=prune_to_ratio, tiny=nn.Sequential(nn.Flatten(), nn.Linear(16, 10)),
        images=torch.rand(4, 1, 4, 4), labels=torch.tensor([0, 1, 2, 3]),
        hooked=hooked, legacy_pruned=legacy_pruned, legacy_norm=legacy_norm, counting=_Counting(),
        no_grad_model=_NoGrad(), leafy=Leafy(), reads_dtype=_ReadsDtype(), huge_model=_scaled(model, 1e20),
        tiny_weights=_scaled(model, 1e-22), zero_width=_ZeroWidth(), dense_pruned_gm=dense_pruned_gm,
        dict_out=_DictOut(), other_run=other_run, bad_header=bad_header, nan_weights=nan_weights,
        bad_layout=bad_layout,
    )


PACKAGE_FOLDERS = [Path(__file__).resolve().parents[1] / name for name in ("cstar_fx", "passes", "export")]


def _error_class(name: str) -> type[BaseException]:
    for where in (cstar_fx, cstar_fx.io, cstar_fx.robust, cstar_fx.export, cstar_fx.passes.trace, builtins):
        if isinstance(getattr(where, name, None), type):
            return getattr(where, name)
    raise AssertionError(f"unknown error class {name!r} in docs/errors.md")


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("function,call,error,message", BAD, ids=[_code(r[1]) for r in BAD])
def test_bad_input_raises_documented_error(names, function, call, error, message):
    before = _snapshot(names["tmp"])
    with pytest.raises(_error_class(_code(error))) as info:
        eval(_code(call), dict(names))  # the call is from our own docs table, like a doctest
    assert message in str(info.value), f"message was: {info.value}"
    if any(Path(entry.path).is_relative_to(folder) for entry in info.traceback for folder in PACKAGE_FOLDERS):
        # raised once the package's code ran (not by Python refusing the call's signature): a CstarError
        assert isinstance(info.value, cstar_fx.CstarError), f"{type(info.value).__name__} is not a CstarError"
    assert _snapshot(names["tmp"]) == before  # a refused call changes nothing on disk


@pytest.mark.parametrize("function,call,check,why", ALLOWED, ids=[_code(r[1]) for r in ALLOWED])
def test_allowed_input_succeeds(names, function, call, check, why):
    scope = dict(names)
    scope["out"] = eval(_code(call), scope)
    with torch.no_grad():
        assert eval(_code(check), scope), why


def test_table_covers_every_public_function_and_names_it_right():
    for function, call, *_ in BAD + ALLOWED:
        assert re.match(rf"{re.escape(function)}\(", _code(call)), f"row for {function} calls {call}"
    covered = {r[0] for r in BAD}
    assert set(PUBLIC) <= covered, f"no bad-input rows for {set(PUBLIC) - covered}"
