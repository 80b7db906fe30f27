"""``cstar-fx demo``: the whole pipeline end to end, shortened; usage errors exit 2 with one line."""

from __future__ import annotations

import re

import pytest
import torch

from cstar_fx.cli import main


def test_demo_runs_the_pipeline_and_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    assert main(["demo", "--epochs", "2", "--ratio", "4", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert torch.get_num_threads() == threads  # the demo's thread setting does not leak
    rows = {m.group(1).strip(): m.groups()[1:] for m in re.finditer(
        r"^(dense PGD-AT teacher|recipe 4x|transform \+ FT 4x)\s+([\d,]+)\s+([\d.]+)x\s+\S+ ep\s+([\d.]+)%\s+([\d.]+)%\s+(.+)$",
        out, re.M)}
    assert set(rows) == {"dense PGD-AT teacher", "recipe 4x", "transform + FT 4x"}, out
    dense_params = int(rows["dense PGD-AT teacher"][0].replace(",", ""))
    for name in ("recipe 4x", "transform + FT 4x"):
        params, ratio, clean, pgd_acc, sanity = rows[name]
        assert float(ratio) >= 4.0 and int(params.replace(",", "")) * 4 <= dense_params
        assert 0 <= float(pgd_acc) <= float(clean) <= 100
    assert all(r[-1] == "ok" for r in rows.values()), out  # every model passed the sanity checks
    assert "PGD-20" in out


@pytest.mark.parametrize("args,message", [(["--ratio", "1"], "--ratio must be > 1"),
                                          (["--eps", "2"], "--eps must be in (0, 1)"),
                                          (["--epochs", "1"], "--epochs must be >= 2")])
def test_demo_usage_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_demo_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "(default: 8.0)" in out and "(default: 0)" in out
