"""Save and load compressed models: one safetensors file with the weights, the rank plan and a checksum.

The file is a standard safetensors file (readable by any safetensors tool), so loading never runs
pickle. Its string metadata holds everything needed to rebuild the factorized model from the
original architecture: the format version, the rank plan and transform report (JSON), the trace
options (modules traced as leaves, whether attention was unpacked), the versions that wrote it, and
a SHA-256 over the weights and all that metadata. :func:`load` rebuilds with ``transform(model, plan=plan)`` and loads the weights with
exact key and shape checks. :func:`save` writes a temporary file in the destination's directory,
fsyncs it and renames it over the destination, so a crash never leaves a half-written file there.

Example:
    >>> import os, tempfile, torch, torch.nn as nn, cstar_fx
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    >>> gm = cstar_fx.transform(model, 2)
    >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> _ = save(gm, path)
    >>> again = load(path, model=model)
    >>> x = torch.randn(2, 64)
    >>> torch.equal(again(x), gm(x))
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .analysis import check_trace_options
from .api import transform
from .errors import (CstarError, CstarFileNotFoundError, CstarIsADirectoryError, CstarTypeError, CstarValueError,
                     PlanMismatchError)
from .extras import require
from .fileutil import atomic_path
from .passes.attention import ExplicitAttention
from .plan import RankPlan, get_plan
from .report import TransformReport, get_report
from .schemes import get
from .version import __version__

__all__ = ["save", "load", "load_weights", "load_tensors", "CheckpointError", "MODEL_FORMAT"]

MODEL_FORMAT = "cstar-fx/model/1"
_FORMAT_FAMILY = "cstar-fx/model/"
_REQUIRED_KEYS = ("format", "plan", "report", "options", "sha256")


class CheckpointError(CstarError, ValueError):
    """A model file is truncated, corrupted, or was not written by :func:`save`.

    Example:
        >>> isinstance(CheckpointError("bad file"), ValueError)
        True
    """


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a plain PyTorch state-dict file into ``model`` (in place) and return ``model``.

    The file is what ``torch.save(model.state_dict(), path)`` writes, or a training checkpoint holding
    it under ``"state_dict"`` or ``"model"``. It is read with ``weights_only=True``, so no code in it
    runs. Raises ``FileNotFoundError`` for a missing file and :class:`CheckpointError` (giving the first
    line of PyTorch's reason) for a file that is not a state dict or does not fit ``model``; ``model`` is
    left unchanged then.

    Example:
        >>> import os, tempfile, torch.nn as nn
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> torch.save({"model": nn.Linear(2, 2).state_dict()}, path)
        >>> isinstance(load_weights(nn.Linear(2, 2), path), nn.Linear)
        True
    """
    path = _as_path(path)
    if not path.is_file():
        raise CstarFileNotFoundError(f"no state-dict file at {str(path)!r}")
    if _is_model_file(path):
        raise CheckpointError(f"{str(path)!r} is a cstar_fx model file, not a state dict: load it with "
                              f"cstar_fx.load(path, model=<the original architecture>)")
    state = _torch_load(path, "a PyTorch state-dict file")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict")
    # load_state_dict copies the tensors that fit before it reports those that do not: check first
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    shapes = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model" for k, v in expected.items()
              if isinstance(v, torch.Tensor) and isinstance(state.get(k), torch.Tensor) and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        problems = [f"{what} {names[:3]}{' ...' if len(names) > 3 else ''}" for what, names in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("other shapes", shapes)) if names]
        raise CheckpointError(f"{str(path)!r} does not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state)
    return model


def load_tensors(path: str | os.PathLike[str]) -> Any:
    """What ``torch.save`` wrote to ``path`` (tensors, numbers, strings, lists and dicts), read on the CPU with
    ``weights_only=True`` so that no code in it runs.

    Raises ``FileNotFoundError`` for a missing file and :class:`CheckpointError` (one line saying why) for a
    file ``torch.load`` cannot read that way: not a ``torch.save`` file, empty or cut short, or holding
    pickled objects other than tensors.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "x.pt")
        >>> torch.save({"x": torch.zeros(2)}, path)
        >>> load_tensors(path)["x"].shape
        torch.Size([2])
    """
    path = _as_path(path)
    if not path.is_file():
        raise CstarFileNotFoundError(f"no file at {str(path)!r}")
    return _torch_load(path, "a PyTorch tensor file")


def _torch_load(path: Path, what: str) -> Any:
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol before it refuses a file
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled code; anything else is not a torch.save file
        raise CheckpointError(f"{str(path)!r} is not {what}: {_load_reason(exc)}") from None


def _load_reason(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in one line (torch's own message is a page of advice)."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        detail = text.partition("WeightsUnpickler error:")[2].partition("Check the documentation")[0]
        detail = " ".join(detail.split()).split(". ")[0][:200]
        return ("it holds pickled objects other than tensors, or is not a torch.save file (torch.load with "
                f"weights_only=True refused it{': ' + detail if detail else ''})")
    if isinstance(exc, EOFError):
        return "it is empty or cut short"
    if isinstance(exc, RuntimeError):
        return _first_line(exc)
    return "it is not a file written by torch.save"  # pickle's own errors (a KeyError, "invalid load key") say no more


def _is_model_file(path: Path) -> bool:
    """Whether ``path`` is a safetensors file whose metadata names a cstar_fx model format (header only)."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if not 0 < size < 100_000_000:
            return False
        try:
            header = json.loads(fh.read(size))
        except ValueError:
            return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and str(meta.get("format", "")).startswith(_FORMAT_FAMILY)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _safetensors() -> Any:
    safetensors, _ = require("safetensors", "safetensors.torch", purpose="cstar_fx.save/load")
    return safetensors


def _as_path(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)) or (isinstance(path, str) and not path):
        raise CstarTypeError(f"path must be a non-empty str or os.PathLike, got {path!r}")
    return Path(os.fspath(path))


def _digest(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every metadata entry (but itself) and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for key in sorted(k for k in meta if k != "sha256"):
        h.update(f"{json.dumps(key)}={json.dumps(meta[key])}\n".encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_factors(gm: fx.GraphModule, plan: RankPlan) -> None:
    """The factor shapes must still be the plan's ranks, or the file could not be rebuilt from the plan."""
    problems = []
    for lp in plan.factorized.values():
        try:
            shape, ranks, _ = get(lp.scheme).read_back(gm.get_submodule(lp.factor_path), lp.weight_shape[2:])
        except (AttributeError, IndexError):
            problems.append(f"layer {lp.name!r}: no factor modules at {lp.factor_path!r}")
            continue
        if ranks != lp.ranks or shape[:2] != lp.weight_shape[:2]:
            problems.append(f"layer {lp.name!r}: its factors make a weight of shape {shape} at ranks {ranks}, the "
                            f"plan one of shape {lp.weight_shape} at ranks {lp.ranks}")
    params = dict(gm.named_parameters(remove_duplicate=False))
    for lp in plan.layers.values():
        if lp.factorized:
            continue
        weight = params.get(lp.param)
        if weight is None:
            problems.append(f"dense layer {lp.name!r}: no weight {lp.param!r} in the model")
        elif tuple(weight.shape) != lp.weight_shape:
            problems.append(f"dense layer {lp.name!r}: weight shape {tuple(weight.shape)}, the plan says {lp.weight_shape}")
    if problems:
        raise CstarValueError("the model was changed after cstar_fx.transform (e.g. pruned), so its rank plan no "
                              "longer describes it and load() could not rebuild it:\n  " + "\n  ".join(problems[:10])
                              + "\nSave the model that transform returned (fine-tuning is fine; changing shapes is "
                                "not).")


def _leaf_names(gm: fx.GraphModule, plan: RankPlan) -> list[str]:
    """Modules the graph calls opaquely, minus the factor layers transform created: traced again as leaves."""
    factor_paths = {lp.factor_path for lp in plan.factorized.values()}
    names = []
    for node in gm.graph.nodes:
        target = str(node.target)
        if node.op == "call_module" and target.rpartition(".")[0] not in factor_paths and target not in names:
            names.append(target)
    return names


def _unpacked_attention(gm: fx.GraphModule, plan: RankPlan) -> bool:
    # the traced graph keeps only the unpacked module's children, so the plan's record is the reliable sign
    return bool(plan.options.get("unpack_attention")) or any(isinstance(m, ExplicitAttention) for m in gm.modules())


def _escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)  # leaf names are matched as glob patterns


def _cpu_tensors(gm: nn.Module) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in gm.state_dict().items():
        if not isinstance(t, torch.Tensor):
            raise CstarTypeError(f"state_dict entry {name!r} is a {type(t).__name__}, not a tensor; cannot save it")
        if t.is_meta:
            raise CstarValueError(f"tensor {name!r} is on the meta device and has no values; load real weights first")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CstarValueError(f"tensor {name!r} contains NaN or Inf; refusing to save a diverged model "
                                  f"(restore an earlier checkpoint or re-initialise that layer)")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()  # safetensors stores each tensor on its own; tied entries are re-tied by load_state_dict
        seen.add(ptr)
        tensors[name] = t
    return tensors


def save(gm: fx.GraphModule, path: str | os.PathLike[str]) -> Path:
    """Write a model made by :func:`cstar_fx.transform` to ``path`` (one safetensors file), atomically.

    Stores the weights (every parameter and persistent buffer), the rank plan and report, the trace
    options needed to rebuild (modules traced as leaves, ``unpack_attention``), the format and package
    versions, and a SHA-256 checksum. The file appears at ``path`` complete or not at all. Returns the
    path written.

    Example:
        >>> import os, tempfile, torch.nn as nn, cstar_fx
        >>> gm = cstar_fx.transform(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)), 2)
        >>> save(gm, os.path.join(tempfile.mkdtemp(), "m.safetensors")).name
        'm.safetensors'
    """
    if not isinstance(gm, nn.Module):
        raise CstarTypeError(f"save expects the GraphModule returned by cstar_fx.transform, got {type(gm).__name__}")
    plan = get_plan(gm)
    report = get_report(gm)
    if not isinstance(plan, RankPlan) or not isinstance(report, TransformReport):
        raise CstarValueError("the model's attached rank plan or report is not a cstar_fx RankPlan/TransformReport; "
                              "save the GraphModule that cstar_fx.transform returned")
    path = _as_path(path)
    if path.is_dir():
        raise CstarIsADirectoryError(f"{str(path)!r} is a directory; pass a file path such as "
                                     f"{str(path / 'model.safetensors')!r}")
    directory = path.parent
    if not directory.is_dir():
        raise CstarFileNotFoundError(f"directory {str(directory)!r} does not exist; create it first (os.makedirs)")
    _check_factors(gm, plan)
    tensors = _cpu_tensors(gm)
    meta = {"format": MODEL_FORMAT, "plan": plan.to_json(indent=None), "report": json.dumps(report.to_dict()),
            "options": json.dumps({"leaf_modules": _leaf_names(gm, plan),
                                   "unpack_attention": _unpacked_attention(gm, plan)}),
            "cstar_fx_version": __version__,
            "torch_version": torch.__version__}
    _parse_header(path, meta)  # what load() will read back must parse: a file that saves, loads
    meta["sha256"] = _digest(meta, tensors)
    st = _safetensors()
    with atomic_path(path) as tmp:
        st.torch.save_file(tensors, str(tmp), metadata=meta)
    return path


def _parse_header(path: Path, meta: dict[str, str]) -> tuple[RankPlan, dict[str, Any], TransformReport]:
    """The plan, rebuild options and report from a file's header; :class:`CheckpointError` naming the entry
    that is wrong (a file with a valid checksum can still have been written by something else)."""
    where = f"{str(path)!r} has a bad header entry"
    try:
        plan = RankPlan.from_json(meta["plan"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{where} 'plan': {exc}") from exc
    try:
        options = json.loads(meta["options"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{where} 'options': not JSON ({exc})") from exc
    if (not isinstance(options, dict) or not isinstance(options.get("leaf_modules"), list)
            or not all(isinstance(n, str) for n in options["leaf_modules"])
            or not isinstance(options.get("unpack_attention"), bool)):
        raise CheckpointError(f"{where} 'options': expected {{\"leaf_modules\": [names], \"unpack_attention\": "
                              f"true/false}}, got {meta['options'][:200]!r}")
    try:
        data = json.loads(meta["report"])
        fields = {f.name for f in dataclasses.fields(TransformReport)}
        report = TransformReport(**{k: v for k, v in data.items() if k in fields})
    except (ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{where} 'report': not a transform report ({type(exc).__name__}: {exc})") from exc
    for key in ("dense_params", "params"):
        value = getattr(report, key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise CheckpointError(f"{where} 'report': {key} must be an int, got {value!r}")
    return plan, options, report


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    st = _safetensors()
    try:
        with st.safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (st.SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{str(path)!r} is not a readable cstar_fx model file (truncated, corrupted, or not "
                              f"written by cstar_fx.save): {exc}") from exc
    fmt = meta.get("format", "")
    if fmt != MODEL_FORMAT:
        if fmt.startswith(_FORMAT_FAMILY):
            raise CheckpointError(f"{str(path)!r} has format {fmt!r}, this cstar_fx {__version__} reads "
                                  f"{MODEL_FORMAT!r}; load it with the cstar_fx version that wrote it "
                                  f"({meta.get('cstar_fx_version', 'unknown')}) or newer")
        raise CheckpointError(f"{str(path)!r} is a safetensors file but not a cstar_fx model file (no "
                              f"{MODEL_FORMAT!r} header); write one with cstar_fx.save(gm, path)")
    missing = [k for k in _REQUIRED_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{str(path)!r} is corrupted: header entries {missing} are missing")
    if _digest(meta, tensors) != meta["sha256"]:
        raise CheckpointError(f"{str(path)!r} is corrupted: its checksum does not match its weights and header "
                              f"(changed after saving); restore it from a backup or save the model again")
    return meta, tensors


def _check_state(path: Path, expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    problems = [f"missing in the file: {k!r}" for k in expected if k not in tensors]
    problems += [f"not in the rebuilt model: {k!r}" for k in tensors if k not in expected]
    problems += [f"{k!r}: file has shape {tuple(t.shape)}, the rebuilt model {tuple(expected[k].shape)}"
                 for k, t in tensors.items() if k in expected and t.shape != expected[k].shape]
    if problems:
        raise PlanMismatchError(
            f"the model passed as model= does not match the one saved in {str(path)!r}:\n  "
            + "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
            + "\nPass the architecture the file was saved from, built with the same arguments.")


def load(path: str | os.PathLike[str], *, model: nn.Module, **options: Any) -> fx.GraphModule:
    """Rebuild a model written by :func:`save` from its original architecture ``model``.

    Reads and verifies the file (checksum, format), runs ``transform(model, plan=saved_plan)`` and
    loads the saved weights with exact key and shape checks (values are cast to ``model``'s dtypes and
    devices, as ``load_state_dict`` does). ``model`` is not modified. ``options`` are transform's trace
    options and override what the file recorded: ``leaf_modules`` (default: the modules the saved graph
    called opaquely), ``unpack_attention`` (default: as saved), ``concrete_args`` and
    ``autowrap_functions`` (not saved: pass them again if transform needed them). Nothing is unpickled and
    nothing is written.

    Example:
        >>> import os, tempfile, torch.nn as nn, cstar_fx
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
        >>> path = save(cstar_fx.transform(model, 2), os.path.join(tempfile.mkdtemp(), "m.safetensors"))
        >>> list(cstar_fx.get_plan(load(path, model=model)).factorized)
        ['0']
    """
    if not isinstance(model, nn.Module):
        raise CstarTypeError(f"model must be the original architecture (an nn.Module) the file was saved from, "
                             f"got {type(model).__name__}")
    check_trace_options(options, "load", "the saved plan")
    path = _as_path(path)
    if not path.is_file():
        raise CstarFileNotFoundError("no model file at "
                                     f"{str(path)!r}" + (" (it is a directory)" if path.is_dir() else ""))
    meta, tensors = _read(path)
    plan, saved, report = _parse_header(path, meta)
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{str(path)!r}: tensor {name!r} contains NaN or Inf (save refuses to write "
                                  f"such a file, so it was written by something else); restore it from a backup")
    user_leaves = "leaf_modules" in options
    options = {"leaf_modules": tuple(_escape(n) for n in saved["leaf_modules"]),
               "unpack_attention": saved["unpack_attention"], **options}
    modules = dict(model.named_modules())
    missing = [n for n in saved["leaf_modules"] if n not in modules]
    # leaves recorded from the model it was saved from (there, submodules; unpacked attention makes its own)
    if missing and not options["unpack_attention"] and not user_leaves:
        raise PlanMismatchError(f"{str(path)!r} was saved from a different architecture than model=: its modules "
                                f"{missing[:4]} are not in model=\n(A model transformed twice loads with "
                                f"model=transform(original, plan=first_plan).)")
    try:
        gm = transform(model, plan=plan, decompose=False, **options)  # every factor weight is loaded below
    except PlanMismatchError as exc:
        raise PlanMismatchError(f"{str(path)!r} was saved from a different architecture than model=: {exc}\n"
                                f"(A model transformed twice loads with model=transform(original, plan=first_plan).)"
                                ) from exc
    expected = gm.state_dict()
    _check_layout(path, plan, expected, tensors)
    _check_state(path, expected, tensors)
    gm.load_state_dict(tensors, strict=True)
    gm.meta["cstar_report"] = report
    return gm


def _check_layout(path: Path, plan: RankPlan, expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]
                  ) -> None:
    """The factor weights must have the shapes the file's own plan gives them, and float tensors must be floats:
    otherwise the file contradicts itself (a wrong layout), whatever model is passed."""
    prefixes = tuple(lp.factor_path + "." for lp in plan.factorized.values())
    problems = []
    for name, t in tensors.items():
        want = expected.get(name)
        if want is None:
            continue
        if name.startswith(prefixes) and t.shape != want.shape:
            problems.append(f"{name!r} has shape {tuple(t.shape)}, its plan gives {tuple(want.shape)}")
        elif want.is_floating_point() != t.is_floating_point():
            problems.append(f"{name!r} has dtype {t.dtype}, the model expects {want.dtype}")
    if problems:
        raise CheckpointError(f"{str(path)!r} has the wrong layout for its own rank plan:\n  "
                              + "\n  ".join(problems[:10]) + "\nIt was not written by cstar_fx.save; save the model "
                              "again from the GraphModule that transform returned")
