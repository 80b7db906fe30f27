"""The command line never loses a user's files and answers every user mistake with exit 2 and one line.

The bad-input table lives in docs/errors.md ("The command line"), so the docs are the test data.
Runs go through ``cstar_fx.cli.main`` in-process (fast); one test runs the real entry point.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cstar_fx import pipeline as P
from cstar_fx.cli import main
from cstar_fx.cli.runfolder import MARKER, STAGING

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
TINY = ["--teacher-epochs", "1", "--joint-epochs", "1", "--finetune-epochs", "1", "--eval-n", "32", "--limit", "128",
        "--train-steps", "1", "--eval-steps", "1", "--batch-size", "64", "--no-export", "--ratios", "4"]


def _table() -> list[tuple[str, str, str]]:
    match = re.search(r"<!-- cli-errors:start -->\n(.*?)<!-- cli-errors:end -->", DOC.read_text(), re.S)
    assert match, "docs/errors.md has no cli-errors table"
    rows = []
    for line in match.group(1).strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 3 and all(c.startswith("`") and c.endswith("`") for c in cells[:2]), line
        rows.append((cells[0][1:-1], cells[1][1:-1], cells[2]))
    return rows


ROWS = _table()


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command, options, message", ROWS, ids=[f"{r[0]} {r[1]}" for r in ROWS])
def test_user_mistake_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, command, options, message):
    (tmp_path / "notes.txt").write_text("the user's own file")
    config = tmp_path / "config.json"
    if options != "-":
        config.write_text(json.dumps({"format": "cstar-fx/config/1", "options": json.loads(options)}))
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{config}", str(config)) for a in shlex.split(command)][1:]
    if argv[0] == "compress" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    before = _snapshot(tmp_path)
    code, _, err = _run(argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err and err.endswith("\n") and err.count("\n") == 1, err
    assert message.replace("{tmp}", str(tmp_path)) in err, err
    assert _snapshot(tmp_path) == before  # nothing written, nothing deleted
    assert not (tmp_path / "out").exists()


def test_the_table_covers_flags_and_config_values():
    assert sum(o == "-" for _, o, _ in ROWS) >= 20 and sum(o != "-" for _, o, _ in ROWS) >= 10


def test_real_entry_point_prints_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "cstar_fx", "compress", "--rho", "0", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert "argument --rho: must be a finite number > 0" in res.stderr


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished decompose run, and a copy of its files to compare against."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["compress", *TINY, "--methods", "decompose", "--out", str(out)]) == 0
    return out


def test_failed_overwrite_keeps_previous_run_and_user_files(finished, tmp_path, capsys, monkeypatch):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    # a bad option: refused before anything is touched
    code, _, err = _run(["compress", *TINY, "--methods", "decompose", "--rho", "0", "--overwrite", "--out", str(out)],
                        capsys)
    assert code == 2 and "--rho" in err
    assert _snapshot(out) == before
    # a run that dies in training: the previous run is still the run folder's content
    import cstar_fx.robust

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash in training")

    monkeypatch.setattr(cstar_fx.robust, "compress", boom)  # the decompose method's entry
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["compress", *TINY, "--methods", "decompose", "--lr", "0.02", "--overwrite", "--out", str(out)])
    capsys.readouterr()
    assert {k: v for k, v in _snapshot(out).items() if not k.startswith(STAGING)} == before
    assert (out / STAGING / "teacher.pt").is_file()  # the new run's progress is kept for its resume
    # the same command again resumes the new run (teacher done) and only then replaces the old one
    monkeypatch.undo()
    code, stdout, err = _run(["compress", *TINY, "--methods", "decompose", "--lr", "0.02", "--overwrite",
                              "--out", str(out)], capsys)
    assert code == 0, err
    assert "resuming" in stdout and "[cstar-fx] teacher ..." not in stdout
    assert (out / "notes.txt").read_text() == "mine" and not (out / STAGING).exists()
    config = json.loads((out / "config.json").read_text())
    assert config["options"]["lr"] == 0.02 and (out / "COMPLETE").is_file()
    listed = set(json.loads((out / MARKER).read_text())["files"])
    assert "notes.txt" not in listed and "results.json" in listed


def test_overwrite_refuses_a_folder_that_is_not_a_run_folder(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("years of work")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.csv").write_text("1,2")
    before = _snapshot(tmp_path)
    code, _, err = _run(["compress", *TINY, "--overwrite", "--out", str(tmp_path)], capsys)
    assert code == 2 and "not a cstar-fx run folder" in err and err.count("\n") == 1
    assert _snapshot(tmp_path) == before


def test_run_folder_with_other_options_is_not_resumed(finished, capsys):
    before = _snapshot(finished)
    code, _, err = _run(["compress", *TINY, "--methods", "decompose", "--lr", "0.2", "--out", str(finished)], capsys)
    assert code == 2 and "other options (lr: 0.05 there, 0.2 here)" in err and "--overwrite" in err
    assert _snapshot(finished) == before


def test_finished_result_is_written_at_once_and_a_rerun_skips_it(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["compress", *TINY, "--methods", "decompose", "prune", "--out", str(out)]
    real, calls = P._compress, []

    def compress_or_crash(method, *args, **kwargs):
        calls.append(method)
        if method == "prune":
            raise RuntimeError("simulated crash")
        return real(method, *args, **kwargs)

    monkeypatch.setattr(P, "_compress", compress_or_crash)
    with pytest.raises(RuntimeError):
        main(argv)
    capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["runs"]] == ["decompose"]  # the finished result survived the crash
    assert "| decompose | 4x |" in (out / "report.md").read_text() and not (out / "COMPLETE").exists()
    calls.clear()
    monkeypatch.setattr(P, "_compress", lambda method, *a, **k: (calls.append(method), real(method, *a, **k))[1])
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    assert calls == ["prune"] and "resuming" in stdout  # decompose was not trained again
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["runs"]] == ["decompose", "prune"]
    assert abs(results["runs"][1]["ratio_params"] / 4 - 1) <= 0.03  # pruning reached the ratio (finer round_to)
    code, stdout, _ = _run(argv, capsys)
    assert code == 0 and "nothing to do" in stdout


def test_config_file_never_imports_code_but_the_flag_does(finished, tmp_path, capsys):
    config = json.loads((finished / "config.json").read_text())
    config["options"]["model_class"] = "cstar_fx.models:SmallCNN"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    code, _, err = _run(["compress", "--config", str(path), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "never imports code" in err and "--model-class cstar_fx.models:SmallCNN" in err
    assert not (tmp_path / "o").exists()


def test_config_values_equal_to_flags_repeat_the_run(finished, tmp_path, capsys):
    code, stdout, err = _run(["compress", "--config", str(finished / "config.json"), "--out", str(finished)], capsys)
    assert code == 0 and "nothing to do" in stdout, err  # same options: the finished run is recognised


def _bad_inputs(folder: Path) -> None:
    """Files a user may hand a command by mistake: text where a checkpoint or ONNX file belongs, a pickle, a folder
    named like a file, an image folder with one unreadable image."""
    import pickle

    import numpy as np
    from PIL import Image

    (folder / "notes.txt").write_text("the user's own file")
    (folder / "text.pt").write_text("hello\n")
    (folder / "text.onnx").write_text("hello\n")
    (folder / "fake.onnx").write_bytes(b"\x08\x07")
    with open(folder / "pickled.pt", "wb") as f:  # protocol 4: torch warns before it refuses the file
        pickle.dump({"w": [1, 2]}, f, protocol=4)
    (folder / "dir.onnx").mkdir()
    for split in ("train", "test"):
        (folder / "imgs" / split / "a").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "imgs" / split / "a" / "0.png")
    (folder / "imgs" / "train" / "a" / "1.png").write_text("not a png")


PROBES = [  # (the command, {tmp} for the folder of _bad_inputs; what its one error line says)
    ("cstar-fx", "give a command: demo, plan, compress, export, bench"),
    ("cstar-fx demo --bogus", "cstar-fx demo: error: unrecognized arguments: --bogus (see cstar-fx demo --help)"),
    ("cstar-fx demo --ratio nan", "argument --ratio: must be a finite number, got 'nan'"),
    ("cstar-fx demo --ratio inf", "argument --ratio: must be a finite number, got 'inf'"),
    ("cstar-fx demo --seed -1", "argument --seed: must be an integer >= 0 and <= 4294967295"),
    ("cstar-fx demo --ratio 100", "--ratio 100: ratio 100 is unreachable"),
    ("cstar-fx plan --ratio 2 --json {tmp}", "--json {tmp} is a folder; pass a file name"),
    ("cstar-fx plan --ratio 2 --json {tmp}/notes.txt/plan.json", "{tmp}/notes.txt is a file, not a folder"),
    ("cstar-fx export --dense-weights {tmp}/text.pt --out {tmp}/m.onnx",
     "is not a PyTorch state-dict file: it is not a file written by torch.save"),
    ("cstar-fx export --dense-weights {tmp}/pickled.pt --out {tmp}/m.onnx",
     "torch.load with weights_only=True refused it"),
    ("cstar-fx export --int8 --calib-data {tmp}/pickled.pt --out {tmp}/m.onnx", "is not a PyTorch tensor file"),
    ("cstar-fx export --plan {tmp}/fake.onnx --out {tmp}/fake.onnx", "--out {tmp}/fake.onnx is also the --plan file"),
    ("cstar-fx export --out {tmp}/dir.onnx", "--out {tmp}/dir.onnx is a folder"),
    ("cstar-fx export --out {tmp}/notes.txt/m.onnx", "{tmp}/notes.txt is a file, not a folder"),
    ("cstar-fx export --opset 1000 --out {tmp}/m.onnx", "--opset: opset 1000 is newer than the installed onnx"),
    ("cstar-fx export --atol nan --out {tmp}/m.onnx", "argument --atol: must be a finite number >= 0"),
    ("cstar-fx bench {tmp}/text.onnx", "{tmp}/text.onnx is not an ONNX model"),
    ("cstar-fx bench {tmp}/fake.onnx --json {tmp}/fake.onnx", "--json {tmp}/fake.onnx is also the ONNX file fake.onnx"),
    ("cstar-fx bench {tmp}/fake.onnx --markdown {tmp}/b.md --json {tmp}/b.md",
     "--markdown {tmp}/b.md is also the --json output"),
    ("cstar-fx bench {tmp}/fake.onnx --providers cuda",
     "onnxruntime has no provider 'cuda'; pass full names such as CUDAExecutionProvider"),
    ("cstar-fx bench {tmp}/fake.onnx --baseline dense", "--baseline 'dense' is not one of the models ['fake']"),
    ("cstar-fx compress --device meta", "--device 'meta' is not supported; use auto, cpu or cuda[:N]"),
    ("cstar-fx compress --seed 99999999999", "argument --seed: must be an integer >= 0 and <= 4294967295"),
    ("cstar-fx compress --checkpoint {tmp}/text.pt", "--checkpoint: '{tmp}/text.pt' is not a PyTorch state-dict file"),
    ("cstar-fx compress --checkpoint {tmp}/pickled.pt --teacher-epochs 3",
     "--checkpoint {tmp}/pickled.pt is the teacher"),
    ("cstar-fx compress --no-export --threads 2", "--threads sets the onnxruntime benchmark, which --no-export skips"),
    ("cstar-fx compress --calib-samples 8", "--calib-samples 8 calibrates the int8 models; add --int8"),
    ("cstar-fx compress --providers NoSuchProvider", "onnxruntime has no provider 'NoSuchProvider'"),
    ("cstar-fx compress --dataset cifar10-jpeg --data {tmp}/notes.txt --model resnet18",
     "{tmp}/notes.txt is not a readable .tar.xz archive"),
    ("cstar-fx compress --dataset folder --data {tmp}/imgs --model resnet18",
     "cannot read the image {tmp}/imgs/train/a/1.png"),
]


@pytest.mark.parametrize("command, message", PROBES, ids=[c for c, _ in PROBES])
def test_more_user_mistakes_are_one_line_exit_2_and_touch_no_file(tmp_path, capsys, monkeypatch, command, message):
    monkeypatch.setenv("CSTAR_FX_CACHE", str(tmp_path / "cache"))
    inputs = tmp_path / "in"
    inputs.mkdir()
    _bad_inputs(inputs)
    argv = [a.replace("{tmp}", str(inputs)) for a in shlex.split(command)][1:]
    if argv and argv[0] == "compress":
        argv += ["--out", str(tmp_path / "out")]
    before = _snapshot(inputs)
    code, _, err = _run(argv, capsys)
    assert code == 2, err
    lines = err[:-1].split("\n")  # one error line, last; before it at most a progress bar's finished line
    assert "Traceback" not in err and "Warning" not in err and all("\r" in line for line in lines[:-1]), err
    assert err.endswith("\n") and message.replace("{tmp}", str(inputs)) in lines[-1], err
    assert _snapshot(inputs) == before  # nothing written into, or next to, the user's files
    assert not (tmp_path / "out").exists()
