"""Property-based fuzzing of ``transform`` over random conv/linear networks (see docs/testing.md).

Default: a bounded, derandomized run (same examples every time, CI-deterministic). Long run:
``CSTAR_FUZZ_EXAMPLES=2000 python -m pytest -q tests/test_fuzz.py``; ``CSTAR_FUZZ_SEED=<int>`` explores
different examples than the fixed default.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st

import cstar_fx
import cstar_fx.io
from cstar_fx import RankPlan
from cstar_fx.allocate import max_ranks, rank_grid
from cstar_fx.costs import LayerSpec, ParamCost
from cstar_fx.io import load, save

from fuzz_nets import FuzzNet, NetSpec, conv_name, linear_name, net_specs

pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel:UserWarning")

EXAMPLES = int(os.environ.get("CSTAR_FUZZ_EXAMPLES", "100"))
SEED = os.environ.get("CSTAR_FUZZ_SEED")


def fuzz(test):
    """Hypothesis settings shared by every property: bounded, no deadline, derandomized unless a seed is given."""
    test = settings(max_examples=EXAMPLES, deadline=None, derandomize=SEED is None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(test)
    return seed(int(SEED))(test) if SEED is not None else test


def _expected_layers(spec: NetSpec) -> tuple[set[str], dict[str, str]]:
    """(factorizable layer names, {unsupported layer: words its reason must contain})."""
    layers = {linear_name(i, h): None for i, h in enumerate(spec.head)}
    for i, c in enumerate(spec.convs):
        layers[conv_name(i, c)] = "groups=" if c.groups > 1 else None
    for name in spec.shared:
        layers[name] = layers.get(name) or "shared with"
    return {n for n, why in layers.items() if why is None}, {n: why for n, why in layers.items() if why}


def _check_layers_accounted(spec: NetSpec, plan: RankPlan, gm: torch.fx.GraphModule, model: FuzzNet) -> None:
    ok, unsupported = _expected_layers(spec)
    assert set(plan.layers) == ok
    assert set(plan.unsupported) == set(unsupported)
    assert all(unsupported[name] in why for name, why in plan.unsupported.items())
    report = cstar_fx.get_report(gm)
    assert set(report.factorized) == set(plan.factorized)
    assert set(report.dense) | set(report.factorized) == ok
    before = dict(model.named_parameters(remove_duplicate=False))
    after = dict(gm.named_parameters(remove_duplicate=False))
    for name in unsupported:  # an unsupported layer is left exactly as it was
        weight = name if name.startswith(("cw", "hw")) else f"{name}.weight"
        assert torch.equal(after[weight], before[weight])


def _close(out: torch.Tensor, ref: torch.Tensor, rtol: float) -> bool:
    return out.shape == ref.shape and float((out - ref).abs().max()) <= rtol * max(1.0, float(ref.abs().max()))


@fuzz
@given(spec=net_specs(), conv_scheme=st.sampled_from(["tucker2", "svd"]))
def test_full_rank_reproduces_outputs(spec: NetSpec, conv_scheme: str) -> None:
    model = FuzzNet(spec).double().eval()
    before = copy.deepcopy(model.state_dict())
    x = spec.example(dtype=torch.float64)
    ok, _ = _expected_layers(spec)
    if not ok:
        with pytest.raises(cstar_fx.NoEligibleLayerError):
            cstar_fx.plan_ranks(model, 2)
        return
    plan = RankPlan.full_rank(model, conv_scheme=conv_scheme)
    gm = cstar_fx.transform(model, plan=plan)
    gm.graph.lint()
    assert set(plan.factorized) == ok
    _check_layers_accounted(spec, plan, gm, model)
    with torch.no_grad():
        assert _close(gm(x), model(x), 1e-9)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the input model is never modified


def _steps_left(plan: RankPlan, round_to: int, min_rank: int) -> list[float]:
    """Parameter cost of every single greedy step the allocator could still take (grow a rank on its grid,
    or switch a layer back to dense) -- an oracle built from the public grid/cost helpers."""
    cost, steps = ParamCost(), []
    for lp in plan.factorized.values():
        weight_numel = math.prod(lp.weight_shape)
        layer = LayerSpec(lp.name, lp.kind, lp.weight_shape, lp.dense_params > weight_numel, ())
        dense, now = cost(layer, "dense", ()), cost(layer, lp.scheme, lp.ranks)
        for mode, full in enumerate(max_ranks(layer, lp.scheme)):
            grid = rank_grid(full, round_to, min_rank)
            i = grid.index(lp.ranks[mode])
            if i + 1 < len(grid):
                ranks = tuple(grid[i + 1] if m == mode else r for m, r in enumerate(lp.ranks))
                steps.append(min(cost(layer, lp.scheme, ranks), dense) - now)
    return steps


def _roundtrip(gm: torch.fx.GraphModule, spec: NetSpec, x: torch.Tensor) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        save(gm, path)
        loaded = load(path, model=FuzzNet(spec).to(x.dtype))  # fresh weights: everything must come from the file
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), gm.eval()(x))
    assert cstar_fx.get_plan(loaded) == cstar_fx.get_plan(gm)


@fuzz
@given(spec=net_specs(),
       ratio=st.one_of(st.sampled_from([1.1, 1.25, 1.5, 2.0, 4.0, 8.0]), st.floats(1.001, 6.0)),
       round_to=st.sampled_from([1, 2, 4, 8]), min_rank=st.sampled_from([1, 1, 3]),
       budget=st.sampled_from(["params", "params", "flops"]), conv_scheme=st.sampled_from(["tucker2", "svd"]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_ratio_meets_budget_or_raises_documented_error(spec: NetSpec, ratio: float, round_to: int, min_rank: int,
                                                       budget: str, conv_scheme: str, dtype: torch.dtype) -> None:
    model = FuzzNet(spec).to(dtype).eval()
    x = spec.example(dtype=dtype)
    options = dict(budget=budget, round_to=round_to, min_rank=min_rank, conv_scheme=conv_scheme)
    ok, _ = _expected_layers(spec)
    event(f"weight sharing: {spec.share}")
    try:
        gm = cstar_fx.transform(model, ratio, example_inputs=x, **options)
    except cstar_fx.NoEligibleLayerError:
        event("no eligible layer")
        assert not ok
        return
    except cstar_fx.UnreachableBudgetError as err:
        event("unreachable budget")
        assert ok and err.max_ratio < ratio and "reachable maximum" in str(err)
        if err.max_ratio > 1.001:  # the reachable maximum the error names is in fact reachable
            target = err.max_ratio * (1 - 1e-6)
            report = cstar_fx.get_report(cstar_fx.transform(model, target, example_inputs=x, **options))
            assert (report.ratio_params if budget == "params" else report.ratio_flops) >= target * (1 - 1e-9)
        return
    plan, report = cstar_fx.get_plan(gm), cstar_fx.get_report(gm)
    event(f"budget met, {len(plan.factorized)} layer(s) factorized" if plan.factorized else "budget met, all dense")
    _check_layers_accounted(spec, plan, gm, model)
    assert report.params == plan.params == sum(p.numel() for p in gm.parameters())
    assert report.flops == pytest.approx(plan.flops, rel=1e-9)
    achieved = plan.ratio_params if budget == "params" else plan.ratio_flops
    assert achieved >= ratio * (1 - 1e-12)
    if budget == "params":
        # Tolerance for tiny nets: ranks move on a grid (round_to), so the budget cannot be met exactly.
        # The greedy stops only when no single step fits: what is left of the budget is smaller than
        # every step still available, which bounds the overshoot of the achieved ratio above the target.
        left = plan.dense_params / ratio - plan.params
        assert all(step > left for step in _steps_left(plan, round_to, min_rank))
    with torch.no_grad():
        out = gm(x)
    assert out.shape == model(x).shape and torch.isfinite(out).all()
    if dtype == torch.float64:
        again = cstar_fx.transform(gm, plan=RankPlan.full_rank(gm))  # double transform: allowed and exact
        with torch.no_grad():
            assert _close(again(x), out, 1e-9)
        _roundtrip(gm, spec, x)


# Issue 13: hostile values for the public API. A call either succeeds or raises a documented error whose
# message names the argument; never an internal exception, never a changed input model.
_BAD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
                        st.text(max_size=4), st.lists(st.integers(-2, 70), max_size=3),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
_INTERNAL = (KeyError, AttributeError, ZeroDivisionError, IndexError)


def _documented(exc: BaseException, argument: str) -> None:
    assert not isinstance(exc, _INTERNAL), f"internal {type(exc).__name__}: {exc}"
    assert isinstance(exc, (ValueError, TypeError, cstar_fx.TraceError)), f"{type(exc).__name__}: {exc}"
    if type(exc) is RuntimeError or (isinstance(exc, RuntimeError) and not isinstance(exc, cstar_fx.TraceError)):
        raise AssertionError(f"raw RuntimeError: {exc}")
    # CstarConfig words param_ratio's error as "ratio must be ..." (cstar_fx/config.py, shared with ratio)
    named = argument in str(exc) or (argument == "param_ratio" and "ratio" in str(exc))
    assert named or isinstance(exc, cstar_fx.UnreachableBudgetError), (argument, str(exc))


def _small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


_API_EXAMPLES = min(EXAMPLES, 25)


@settings(max_examples=_API_EXAMPLES, deadline=None, derandomize=SEED is None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(argument=st.sampled_from(["ratio", "round_to", "min_rank", "skip", "conv_scheme", "budget", "param_ratio"]),
       value=_BAD_VALUES, verb=st.sampled_from(["transform", "plan_ranks"]))
def test_api_bad_values_get_documented_errors(argument: str, value: object, verb: str) -> None:
    model = _small_model()
    before = copy.deepcopy(model.state_dict())
    kwargs = {argument: value} if argument != "ratio" else {}
    ratio = value if argument == "ratio" else 1.5
    try:
        getattr(cstar_fx, verb)(model, ratio, **kwargs)
    except Exception as exc:  # noqa: BLE001 (the property is about which exceptions escape)
        _documented(exc, argument if argument != "ratio" else "ratio")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@settings(max_examples=_API_EXAMPLES, deadline=None, derandomize=SEED is None, database=None)
@given(field=st.sampled_from(["ranks", "weight_shape", "scheme", "kind", "name", "energy", "params", "layers",
                              "target_ratio", "options", "format"]), value=_BAD_VALUES)
def test_plan_json_bad_fields_are_value_errors(field: str, value: object) -> None:
    import json

    plan = cstar_fx.plan_ranks(_small_model(), 1.5, round_to=4)
    data = json.loads(plan.to_json())
    if field in data:
        data[field] = value
    else:
        data["layers"][0][field] = value
    try:
        parsed = RankPlan.from_json(json.dumps(data))
    except ValueError as exc:
        assert not isinstance(exc, _INTERNAL)
        return
    parsed.table()  # whatever parses can be shown


@settings(max_examples=_API_EXAMPLES, deadline=None, derandomize=SEED is None, database=None)
@given(argument=st.sampled_from(["eps", "alpha", "steps", "restarts", "norm", "x", "y"]), value=_BAD_VALUES)
def test_attack_bad_values_get_documented_errors(argument: str, value: object) -> None:
    from cstar_fx.robust import pgd

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    before = copy.deepcopy(model.state_dict())
    kwargs: dict[str, object] = dict(eps=0.1, steps=2)
    x, y = torch.rand(2, 1, 2, 2), torch.tensor([0, 1])
    if argument == "x":
        x = value
    elif argument == "y":
        y = value
    else:
        kwargs[argument] = value
    try:
        pgd(model, x, y, **kwargs)
    except Exception as exc:  # noqa: BLE001
        _documented(exc, argument)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@settings(max_examples=_API_EXAMPLES, deadline=None, derandomize=SEED is None, database=None)
@given(argument=st.sampled_from(["n", "batch_size", "sanity_n"]), value=_BAD_VALUES)
def test_evaluate_bad_values_get_documented_errors(argument: str, value: object) -> None:
    from cstar_fx.robust import AttackConfig, evaluate

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    data = (torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 2, 0]))
    try:
        evaluate(model, data, attack=AttackConfig(eps=0.1, steps=1), sanity=False, progress=False, **{argument: value})
    except Exception as exc:  # noqa: BLE001
        _documented(exc, argument)


@settings(max_examples=_API_EXAMPLES, deadline=None, derandomize=SEED is None, database=None)
@given(flip=st.integers(0, 10_000), entry=st.sampled_from(["plan", "report", "options"]), value=_BAD_VALUES)
def test_save_load_crafted_files_are_checkpoint_errors(flip: int, entry: str, value: object) -> None:
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    model = _small_model()
    with tempfile.TemporaryDirectory() as tmp:
        path = save(cstar_fx.transform(model, 1.5, round_to=4), os.path.join(tmp, "m.safetensors"))
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
        meta[entry] = json.dumps(value) if flip % 2 else str(value)
        meta["sha256"] = cstar_fx.io._digest(meta, tensors)
        save_file(tensors, str(path), metadata=meta)
        try:
            load(path, model=model)
        except cstar_fx.io.CheckpointError:
            pass
        except Exception as exc:  # noqa: BLE001
            raise AssertionError(f"{type(exc).__name__} instead of CheckpointError: {exc}") from exc


def _valued_options() -> list[tuple[str, str]]:
    from cstar_fx.cli import build_parser

    out = []
    for command, sub in build_parser()._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if action.option_strings and action.nargs != 0 and action.dest not in ("help", "config"):
                out.append((command, action.option_strings[-1]))
    return sorted(out)


VALUED = _valued_options()


@fuzz
@given(option=st.sampled_from(VALUED),
       value=st.one_of(st.text(max_size=12), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                       st.integers(-10**6, 10**6).map(str), st.sampled_from(["nan", "-inf", "1e309", "0", "-1", "8/0",
                                                                            "1/0", "", "--", "None"])))
def test_cli_parsers_reject_bad_values_with_one_line_naming_the_option(option: tuple[str, str], value: str) -> None:
    """Every sub-command option, any text: parsed, or a one-line UsageError that names the option."""
    from cstar_fx.cli import UsageError, build_parser

    command, flag = option
    try:
        build_parser().parse_args([command, f"{flag}={value}"])
    except UsageError as exc:
        message = str(exc)
        assert "\n" not in message.strip(), message
        assert flag in message, message
        event("refused")
    else:
        event("parsed")
