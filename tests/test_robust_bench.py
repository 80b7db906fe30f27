"""The equal-compute robust benchmark's bookkeeping: paired differences, uniform plans, the compute record."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest
import torch

import cstar_fx
from cstar_fx.models import small_cnn

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def table():  # noqa: ANN201
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("robust_table", BENCH / "robust_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["robust_table"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("robust_table", None)
    sys.path.remove(str(BENCH))


def _row(seed: int, method: str, clean: float, pgd: float, aa: float | None = None) -> dict:
    row = {"seed": seed, "method": method, "ratio": 16.0, "clean": clean, "pgd20": pgd, "sanity": True,
           "ratio params": 16.0, "ratio FLOPs": 3.0, "train s": 1.0, "student passes": 90}
    if aa is not None:
        row["autoattack"] = aa
    return row


def test_paired_differences_are_per_seed_and_the_verdict_uses_their_spread(table) -> None:  # noqa: ANN001
    rows = [_row(0, "data_distill", 40, 25, 20), _row(1, "data_distill", 42, 27, 22), _row(2, "data_distill", 38, 24),
            _row(0, "transform_ft", 39, 22, 18), _row(1, "transform_ft", 41, 24, 19), _row(2, "transform_ft", 37, 21),
            _row(0, "prune_ft", 45, 20), _row(1, "prune_ft", 30, 30)]
    agg, paired = table.summarise(rows, (16.0,), ["transform_ft", "prune_ft", "data_distill"], reference="data_distill")
    by = {p["vs"]: p for p in paired}
    vs_t = by[table.LABELS["transform_ft"]]
    assert vs_t["seeds"] == 3 and vs_t["Δ PGD-20"] == "3.00 ± 0.00" and vs_t["PGD-20 gain > 2 sd"] == "yes"
    assert vs_t["Δ AutoAttack"] == f"{statistics.mean([2, 3]):.2f} ± {statistics.stdev([2, 3]):.2f} (2 seeds)"
    vs_p = by[table.LABELS["prune_ft"]]  # seed 2 has no pruning result: only seeds 0 and 1 are paired
    assert vs_p["seeds"] == 2 and vs_p["Δ PGD-20"] == f"{statistics.mean([5, -3]):.2f} ± {statistics.stdev([5, -3]):.2f}"
    assert vs_p["PGD-20 gain > 2 sd"] == "no"
    rec = next(r for r in agg if r["method"] == table.LABELS["data_distill"])
    assert rec["seeds"] == 3 and rec["PGD-20 %"] == f"{statistics.mean([25, 27, 24]):.2f} ± {statistics.stdev([25, 27, 24]):.2f}"


def test_uniform_plan_keeps_one_rank_fraction_and_reaches_the_ratio(table) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = small_cnn(width=16)
    plan = table.uniform_plan(model, 4.0)
    full = cstar_fx.RankPlan.full_rank(model)
    fractions = [r / f for name, lp in plan.factorized.items() for r, f in zip(lp.ranks, full.layers[name].ranks)
                 if f >= 8]  # a mode of a few channels is clamped at rank 1
    assert max(fractions) - min(fractions) < 0.1  # rounding aside, the same fraction everywhere
    gm = cstar_fx.transform(model, plan=plan)
    dense = sum(p.numel() for p in model.parameters())
    assert dense / sum(p.numel() for p in gm.parameters()) >= 4.0


def test_every_method_is_given_the_same_adversarial_epochs(table) -> None:  # noqa: ANN001
    for name, prof in table.PROFILES.items():
        assert 0 < prof.joint_epochs < prof.ft_epochs, name  # CSTAR's joint epochs come out of the same total
    assert set(table.METHODS) <= set(table.LABELS) and table.RECOMMENDED in table.METHODS


def test_the_benchs_reference_row_is_the_librarys_recommended_recipe(table) -> None:  # noqa: ANN001
    from cstar_fx.robust import RECOMMENDED

    budget, share, epochs, sensitivity, distill = table.PRUNED_FIRST[table.RECOMMENDED]
    assert (budget, share, epochs) == (RECOMMENDED.budget, RECOMMENDED.prune, RECOMMENDED.prune_epochs)
    assert sensitivity == bool(RECOMMENDED.sensitivity) and distill == bool(RECOMMENDED.distill)
    assert table.PROFILES["cpu"].calibrate == RECOMMENDED.calibrate and RECOMMENDED.distill == 0
    # the distilling row is the recipe with the baselines' distilling fine-tune, nothing else changed
    assert table.PRUNED_FIRST["staged_distill"] == table.PRUNED_FIRST[table.RECOMMENDED]._replace(distill=True)


def test_paired_differences_against_another_reference_and_the_apgd_column(table) -> None:  # noqa: ANN001
    rows = [_row(0, "hybrid_ft", 40, 25), _row(1, "hybrid_ft", 42, 27), _row(0, "prune_ft", 39, 24),
            _row(1, "prune_ft", 41, 25)]
    for r, apgd in zip(rows, (21, 23, 20, 20)):
        r["apgd"] = apgd
    agg, paired = table.summarise(rows, (16.0,), ["hybrid_ft", "prune_ft"], reference="hybrid_ft", aa_key="apgd")
    assert [p["vs"] for p in paired] == [table.LABELS["prune_ft"]]
    assert paired[0]["Δ PGD-20"] == f"{statistics.mean([1, 2]):.2f} ± {statistics.stdev([1, 2]):.2f}"
    assert paired[0]["Δ APGD-CE+T"] == f"{statistics.mean([1, 3]):.2f} ± {statistics.stdev([1, 3]):.2f}"
    assert next(r for r in agg if r["method"] == table.LABELS["hybrid_ft"])["APGD-CE+T %"] == "22.00 ± 1.41"
    rows += [_row(2, "hybrid_ft", 41, 26), _row(2, "prune_ft", 40, 24)]  # a third seed without APGD yet
    agg, paired = table.summarise(rows, (16.0,), ["hybrid_ft", "prune_ft"], reference="hybrid_ft", aa_key="apgd")
    assert paired[0]["seeds"] == 3 and paired[0]["Δ PGD-20"].endswith(f"{statistics.stdev([1, 2, 2]):.2f}")
    assert paired[0]["Δ APGD-CE+T"].endswith(" (2 seeds)")
    assert next(r for r in agg if r["method"] == table.LABELS["hybrid_ft"])["APGD-CE+T %"] == "22.00 ± 1.41 (2 seeds)"


def test_flop_budget_plan_is_found_at_the_parameter_ratio_asked_for(table) -> None:  # noqa: ANN001
    model, x = small_cnn(width=16), torch.rand(1, 1, 8, 8)
    flops = table.flops_ratio_at_params(model, 4.0, x)
    plan = cstar_fx.plan_ranks(model, flops, budget="flops", example_inputs=x, round_to=1)
    assert plan.ratio_params >= 4.0 and plan.ratio_params < 4.0 * 1.05


def test_autoattack_subset_covers_every_class_of_a_class_sorted_test_set(table) -> None:  # noqa: ANN001
    from cstar_fx.data import TensorData

    y = torch.arange(10).repeat_interleave(100)  # sorted by class, as the CPU profile's subset is
    sub = table.aa_subset(TensorData(torch.zeros(1000, 1, 2, 2), y), 200)
    assert len(sub) == 200 and sub.y.bincount().tolist() == [20] * 10


def test_held_out_images_are_the_ones_after_the_tables_own_per_class(table) -> None:  # noqa: ANN001
    from cstar_fx.data import TensorData

    y = torch.arange(3).repeat(5)  # interleaved classes: position within a class, not in the file
    x = torch.arange(15, dtype=torch.uint8).view(15, 1, 1, 1)
    wide = TensorData(x, y)
    first = wide.subset(torch.tensor([0, 1, 2, 3, 4, 5]))  # the first two of each class
    held = table.images_after(wide, first, 2)
    assert held.x.flatten().tolist() == list(range(6, 15)) and held.y.bincount().tolist() == [3, 3, 3]
    with pytest.raises(RuntimeError, match="could overlap"):
        table.images_after(wide, wide.subset(torch.tensor([0, 1, 2, 3, 4, 6])), 2)
    after = table.images_after(wide, first, 2, skip=2)  # the confirmation images: after the held-out ones too
    assert after.x.flatten().tolist() == list(range(12, 15))


def test_the_cpu_profiles_test_splits_are_disjoint_and_fit_in_cifar10(table) -> None:  # noqa: ANN001
    prof = table.PROFILES["cpu"]
    for source, first, available in (("test", prof.test_per_class, 1000), ("train", prof.train_per_class, 5000)):
        sizes = [first] + [getattr(prof, f"{s}_per_class") for s, split in table.SPLITS.items() if split.source == source]
        assert all(n > 0 for n in sizes) and sum(sizes) <= available  # CIFAR-10's images per class in that split


def test_paired_differences_on_the_held_out_images_have_their_own_verdict(table) -> None:  # noqa: ANN001
    rows = [_row(0, "hybrid_both", 40, 25), _row(1, "hybrid_both", 42, 27), _row(2, "hybrid_both", 41, 26),
            _row(0, "prune_ft", 39, 23), _row(1, "prune_ft", 41, 25), _row(2, "prune_ft", 40, 24)]
    for r, (clean, pgd) in zip(rows, ((38, 24), (40, 25), (39, 26), (37, 24), (40, 24), (38, 25))):
        r["clean heldout"], r["pgd20 heldout"] = clean, pgd
    agg, paired = table.summarise(rows, (16.0,), ["hybrid_both", "prune_ft"], reference="hybrid_both")
    assert paired[0]["PGD-20 gain > 2 sd"] == "yes"  # +2 on every seed of the table's own images
    assert paired[0]["Δ PGD-20 held-out"] == f"{statistics.mean([0, 1, 1]):.2f} ± {statistics.stdev([0, 1, 1]):.2f}"
    assert paired[0]["PGD-20 held-out gain > 2 sd"] == "no"  # the held-out images disagree
    assert paired[0]["Δ clean held-out"] == f"{statistics.mean([1, 0, 1]):.2f} ± {statistics.stdev([1, 0, 1]):.2f}"
    assert next(r for r in agg if r["method"] == table.LABELS["prune_ft"])["PGD-20 % held-out"] == "24.33 ± 0.58"


def test_confirmation_images_get_their_own_columns_and_verdict(table) -> None:  # noqa: ANN001
    rows = [_row(0, "hybrid_both", 40, 25), _row(1, "hybrid_both", 42, 27), _row(2, "hybrid_both", 41, 26),
            _row(0, "prune_ft", 39, 23), _row(1, "prune_ft", 41, 25), _row(2, "prune_ft", 40, 24)]
    for r, pgd in zip(rows, (25, 26, 27, 22, 23, 24)):
        r["clean confirm"], r["pgd20 confirm"] = 40, pgd
    agg, paired = table.summarise(rows, (16.0,), ["hybrid_both", "prune_ft"], reference="hybrid_both")
    assert paired[0]["Δ PGD-20 confirmation"] == "3.00 ± 0.00"
    assert paired[0]["PGD-20 confirmation gain > 2 sd"] == "yes"
    assert "PGD-20 held-out gain > 2 sd" not in paired[0]  # no held-out results: no verdict on them
    assert next(r for r in agg if r["method"] == table.LABELS["prune_ft"])["PGD-20 % confirmation"] == "23.00 ± 1.00"


def test_a_longer_fine_tune_gets_its_own_cells_on_the_same_teachers(table) -> None:  # noqa: ANN001
    prof = table.PROFILES["cpu"]
    longer = table._args(["--profile", "cpu", "--ft-epochs", str(prof.ft_epochs * 2)])
    assert longer.variant == f"ft{prof.ft_epochs * 2}"
    assert table._args(["--profile", "cpu", "--ft-epochs", str(prof.ft_epochs)]).variant == ""  # the profile's own
    assert table._args(["--profile", "cpu", "--handoff", "--methods", "prune_ft"]).variant == "handoff"
    for bad in (["--ft-epochs", str(prof.joint_epochs)], ["--handoff", "--ft-epochs", "6"]):
        with pytest.raises(SystemExit) as err:
            table._args(["--profile", "cpu", *bad])
        assert err.value.code == 2


def test_other_teachers_make_a_separate_benchmark(table) -> None:  # noqa: ANN001
    prof = table.PROFILES["cpu"]
    own = table._args(["--profile", "cpu"])
    longer = table._args(["--profile", "cpu", "--teacher-epochs", str(prof.teacher_epochs * 2), "--ft-epochs", "6"])
    assert longer.runs.name == f"robust_cpu_t{prof.teacher_epochs * 2}" != own.runs.name  # no teacher or cell shared
    assert longer.variant == "ft6"  # the fine-tune's folder inside it, as for the profile's teachers
    assert table._args(["--profile", "cpu", "--teacher-epochs", str(prof.teacher_epochs)]).runs == own.runs
    with pytest.raises(SystemExit) as err:
        table._args(["--profile", "cpu", "--teacher-epochs", "0"])
    assert err.value.code == 2


def test_the_fresh_training_images_come_after_the_unseen_ones_and_the_reserve_after_them(table) -> None:  # noqa: ANN001
    train = [name for name, split in table.SPLITS.items() if split.source == "train"]
    assert train == ["unseen", "fresh", "reserve"] and table.PROFILES["cpu"].fresh_per_class > 0
    prof = table.PROFILES["cpu"]  # the reserve's blocks are whole and class-balanced
    assert prof.reserve_per_class % table.SPLITS["reserve"].blocks == 0


def test_class_blocks_are_balanced_disjoint_and_average_to_the_whole(table) -> None:  # noqa: ANN001
    from cstar_fx.data import TensorData

    y = torch.arange(3).repeat(4)  # interleaved classes, 4 images each
    data = TensorData(torch.arange(12, dtype=torch.uint8).view(12, 1, 1, 1), y)
    blocks = table.class_blocks(data, 2)
    assert [b.y.bincount().tolist() for b in blocks] == [[2, 2, 2], [2, 2, 2]]
    assert blocks[0].x.flatten().tolist() == [0, 1, 2, 3, 4, 5]  # the first two of each class, in order
    assert sorted(blocks[0].x.flatten().tolist() + blocks[1].x.flatten().tolist()) == list(range(12))
    assert table.class_blocks(data, 1) == [data]
    with pytest.raises(ValueError, match="divisible by 3"):
        table.class_blocks(data, 3)


def test_the_evaluation_noise_of_a_paired_difference_is_its_spread_over_the_blocks(table) -> None:  # noqa: ANN001
    key = "pgd20 reserve blocks"
    rec = [{key: [30.0, 32.0, 31.0, 29.0, 33.0]}, {key: [30.0, 30.0, 30.0, 30.0, 30.0]}]
    other = [{key: [29.0, 29.0, 29.0, 29.0, 29.0]}, {key: [29.0, 31.0, 29.0, 31.0, 30.0]}]
    first = statistics.variance([1.0, 3.0, 2.0, 0.0, 4.0]) / 5
    second = statistics.variance([1.0, -1.0, 1.0, -1.0, 0.0]) / 5
    mean = statistics.variance([1.0, 1.0, 1.5, -0.5, 2.0]) / 5  # the two seeds' differences averaged per block
    assert table.evaluation_sd(rec, other, key) == pytest.approx((((first + second) / 2) ** 0.5, mean ** 0.5))
    assert table.evaluation_sd(rec, [{}, other[1]], key) is None  # a row without blocks: no estimate
    rows = [_row(s, m, 40, 25) for m in ("hybrid_staged", "prune_ft") for s in (0, 1)]
    for r, blocks in zip(rows, rec + other):
        r[key], r["pgd20 reserve"] = blocks[key], statistics.mean(blocks[key])
    _, paired = table.summarise(rows, (16.0,), ["hybrid_staged", "prune_ft"])
    sd = ((first + second) / 2) ** 0.5
    assert paired[0]["Δ PGD-20 reserve training evaluation sd"] == (f"{sd:.2f} per seed ({sd * 5 ** 0.5:.2f} on a "
                                                                      f"block), {mean ** 0.5:.2f} of the mean")


def test_autoattack_on_a_split_takes_its_first_images_per_class_and_has_its_own_paired_column(table) -> None:  # noqa: ANN001
    from cstar_fx.data import TensorData

    data = TensorData(torch.arange(12, dtype=torch.uint8).view(12, 1, 1, 1), torch.arange(3).repeat(4))
    assert table.first_per_class(data, 2).x.flatten().tolist() == [0, 1, 2, 3, 4, 5]
    args = table._args(["--profile", "cpu", "--aa-split", "reserve"])
    assert args.splits == ("reserve",) and not args.autoattack  # the split is scored; the table's AA is not run
    with pytest.raises(SystemExit) as err:
        table._args(["--profile", "cpu", "--handoff", "--aa-split", "reserve", "--methods", "prune_ft"])
    assert err.value.code == 2
    rows = [_row(s, m, 40, 25) for m in ("hybrid_staged", "prune_ft") for s in (0, 1)]
    for r, aa in zip(rows, (20.0, 22.0, 19.0, 20.0)):
        r["apgd reserve"] = aa
    _, paired = table.summarise(rows, (16.0,), ["hybrid_staged", "prune_ft"], aa_key="apgd")
    assert paired[0]["Δ APGD-CE+T reserve training"] == "1.50 ± 0.71"
    assert not any("the APGD-CE+T images" in col for col in paired[0])  # no column for a PGD-20 never run there
    for r, pgd in zip(rows, (26.0, 27.0, 24.0, 24.0)):
        r["pgd20 apgd reserve"] = pgd
    agg, paired = table.summarise(rows, (16.0,), ["hybrid_staged", "prune_ft"], aa_key="apgd")
    assert paired[0]["Δ PGD-20 reserve training, the APGD-CE+T images"] == "2.50 ± 0.71"
    assert agg[0]["PGD-20 % reserve training, the APGD-CE+T images"] == "26.50 ± 0.71"
