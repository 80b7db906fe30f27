"""Issue 13, classes 3-8: each test here failed on the code before the fix (see docs/errors.md for the row-level cases)."""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune

import cstar_fx
from cstar_fx import RankPlan, get_plan, get_report, load, plan_ranks, save, transform
from cstar_fx.decompose import mode_spectra
from cstar_fx.passes.trace import TraceError
from toy_nets import Leafy


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


class _Cache(nn.Module):
    """timm's LeViT/EfficientFormer pattern: forward fills an attribute cache (here keyed by a traced value)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.cache: dict[str, int] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.cache.setdefault("seen", 0)
        self.cache["seen"] += 1
        return self.fc(x)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# class 3: tracing never changes the input and never silently drops behaviour
def test_tracing_leaves_attribute_caches_and_state_untouched():
    model = _Cache()
    before = _state(model)
    plan_ranks(model, 1.5, round_to=4)
    transform(model, 1.5, round_to=4)
    assert model.cache == {}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("make", ["hook", "pre_hook", "prune", "spectral_norm", "weight_norm"])
def test_full_rank_transform_is_exact_or_refused(make):
    model = _mlp().double()
    target = model[0]
    if make == "hook":
        target.register_forward_hook(lambda m, i, o: o * 2)
    elif make == "pre_hook":
        model.register_forward_pre_hook(lambda m, i: (i[0] + 1,))
    elif make == "prune":
        torch.nn.utils.prune.random_unstructured(target, "weight", 0.5)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            getattr(torch.nn.utils, make)(target)
    x = torch.randn(3, 64, dtype=torch.float64)
    try:
        gm = transform(model, plan=RankPlan.full_rank(model))
    except TraceError as err:
        assert "Fix:" in str(err)
        return
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-9)


# class 4: a file that saves, loads; crafted files get CheckpointError
@pytest.mark.parametrize("edit", [dict(scheme="dense"), dict(ranks=[16]), dict(scheme="dense", ranks=())])
def test_edited_plan_saves_and_loads(tmp_path: Path, edit):
    model = _mlp()
    plan = plan_ranks(model, 2).with_layer("0", **edit)
    gm = transform(model, plan=plan)
    back = load(save(gm, tmp_path / "m.safetensors"), model=model)
    assert get_plan(back) == get_plan(gm)
    x = torch.randn(2, 64)
    assert torch.equal(back(x), gm(x))


@pytest.mark.parametrize("entry,value", [("plan", "{}"), ("plan", "not json"), ("report", "[]"), ("report", "{"),
                                         ("options", "null"), ("options", '{"leaf_modules": 3}')])
def test_crafted_header_with_valid_checksum_is_a_checkpoint_error(tmp_path: Path, entry, value):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = _mlp()
    path = save(transform(model, 2), tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta[entry] = value
    meta["sha256"] = cstar_fx.io._digest(meta, tensors)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(cstar_fx.io.CheckpointError, match=entry):
        load(path, model=model)


# class 6: scale-free spectra
@pytest.mark.parametrize("scale", [1e20, 1e-22, 1e30, 1e-30])
def test_spectra_and_weight_errors_do_not_depend_on_the_weights_scale(scale):
    w = torch.randn(16, 8, 3, 3)
    ref = [s.kept_energy(4) for s in mode_spectra(w)]
    assert [s.kept_energy(4) for s in mode_spectra(w * scale)] == pytest.approx(ref, rel=1e-4)
    model = _mlp()
    big = copy.deepcopy(model)
    with torch.no_grad():
        for p in big.parameters():
            p.mul_(scale)
    assert get_report(transform(big, 2)).errors == pytest.approx(get_report(transform(model, 2)).errors, rel=1e-4)


# class 7: a failed export leaves the good file; float64 models export
def test_failed_export_keeps_the_previous_file(tmp_path: Path):
    pytest.importorskip("onnxruntime")
    from cstar_fx.export import to_onnx

    model, x = nn.Sequential(nn.Linear(4, 2)), torch.randn(3, 4)
    path = to_onnx(model, x, tmp_path / "m.onnx")
    good = path.read_bytes()
    with pytest.raises(ValueError, match="opset=9 was asked for"):
        to_onnx(nn.Sequential(nn.Linear(4, 2)), x, path, opset=9)
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert to_onnx(model.double(), x.double(), tmp_path / "d.onnx").is_file()


# class 8: advice that works
def test_suggested_ratio_is_reachable():
    model = _mlp()
    with pytest.raises(cstar_fx.UnreachableBudgetError) as info:
        transform(model, 1000)
    suggested = float(re.search(r"ratio <= ([0-9.]+)", str(info.value)).group(1))
    assert suggested <= info.value.max_ratio
    assert get_report(transform(model, suggested)).ratio_params >= suggested
    assert "skip" not in str(info.value)  # nothing was skipped, so no advice about skip=


def test_layers_hidden_in_a_leaf_are_reported():
    gm = transform(Leafy(), 1.05, leaf_modules=("blk",), round_to=1)
    assert "hidden inside 'blk'" in get_report(gm).unsupported["blk.0"]
    assert "blk.0" in str(get_report(gm))
