"""``cstar-fx bench``: onnxruntime latency of ONNX files, or of a model dense vs compressed, in one table."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from . import UsageError
from .export_cmd import add_model_args, build_models
from .options import check_output, check_providers, write_output

__all__ = ["register", "run"]

_GRAPH = {"off": False, "on": True, "both": "both"}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``bench`` sub-command.

    Example:
        >>> import argparse
        >>> p = argparse.ArgumentParser(); register(p.add_subparsers())
    """
    p = sub.add_parser("bench", help="onnxruntime latency: ONNX files, or a model dense vs its --ratio/--plan form",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Give ONNX files to compare them, or no files and --ratio/--plan to export "
                                   "--model dense and compressed and compare those.")
    p.add_argument("onnx", nargs="*", type=Path, help="ONNX files to compare (named by file stem)")
    add_model_args(p)
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="export dtype (model mode)")
    p.add_argument("--baseline", default=None, help="model name speedups are relative to (default: the first)")
    p.add_argument("--providers", nargs="+", default=["CUDAExecutionProvider", "CPUExecutionProvider"],
                   help="onnxruntime execution providers")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64, 256], help="batch sizes")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs per model and batch size")
    p.add_argument("--iters", type=int, default=50, help="timed runs per model and batch size")
    p.add_argument("--cuda-graph", choices=tuple(_GRAPH), default="off", help="CUDA graphs on the CUDA provider")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--allow-spinning", action="store_true",
                   help="let onnxruntime's idle threads spin-wait (off: they would steal cores from the timed session)")
    p.add_argument("--json", type=Path, default=None, help="write the result as JSON here")
    p.add_argument("--markdown", type=Path, default=None, help="write the markdown table here")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export (model mode) and benchmark; print the table; write JSON/markdown when asked."""
    from cstar_fx.export import OnnxExportError, OnnxMismatchError, benchmark, export_onnx

    compress = args.ratio is not None or args.plan is not None
    if args.onnx and compress:
        raise UsageError("give ONNX files or --ratio/--plan (model mode), not both")
    if not args.onnx and not compress:
        raise UsageError("nothing to compare: give ONNX files, or --ratio 8 (or --plan PLAN) to compare "
                         f"--model {args.model} dense vs compressed")
    label = "" if args.onnx else (f"cstar {args.ratio:g}x" if args.ratio is not None else f"cstar plan {args.plan.stem}")
    names = [path.stem for path in args.onnx] if args.onnx else ["dense", label]
    if args.baseline is not None and args.baseline not in names:
        raise UsageError(f"--baseline {args.baseline!r} is not one of the models {names}; pass one of them")
    _check_outputs(args)
    check_providers(args.providers)
    with tempfile.TemporaryDirectory(prefix="cstar_bench_") as tmp:
        extra: dict[str, dict[str, str]] = {}
        if args.onnx:
            models: dict[str, Path] = {}
            for path in args.onnx:
                if path.stem in models:
                    raise UsageError(f"two files are named {path.stem!r}; rename one")
                models[path.stem] = path
            for path in args.onnx:
                _check_onnx_file(path)
        else:
            built = build_models(args)
            models = {}
            try:
                for name, model in (("dense", built.dense), (label, built.compressed)):
                    out = Path(tmp) / f"{len(models)}.onnx"
                    result = export_onnx(model, built.example, out, dtype=args.dtype)
                    print(f"{name}: {result.verification}")
                    models[name] = out
            except ImportError as exc:
                raise UsageError(str(exc)) from None
            except (OnnxExportError, OnnxMismatchError) as exc:
                print(f"export FAILED: {exc}")
                return 1
            r = built.report
            extra = {"dense": {"params ratio": "1.00x", "FLOP ratio": "1.00x"},
                     label: {"params ratio": f"{r.ratio_params:.2f}x",
                             "FLOP ratio": f"{r.ratio_flops:.2f}x" if r.ratio_flops else "-"}}
        try:
            result = benchmark(models, providers=tuple(args.providers), batch_sizes=tuple(args.batch_sizes),
                               warmup=args.warmup, iters=args.iters, cuda_graph=_GRAPH[args.cuda_graph],
                               baseline=args.baseline, intra_op_threads=args.threads,
                               allow_spinning=args.allow_spinning,
                               progress=not args.no_progress)
        except ImportError as exc:
            raise UsageError(str(exc)) from None
        except (ValueError, FileNotFoundError) as exc:
            raise UsageError(str(exc).replace("\n", " ")) from None
    table = result.to_markdown(extra)
    print(table)
    if args.json:
        write_output(args.json, result.to_json(), "--json")
        print(f"JSON written to {args.json}")
    if args.markdown:
        write_output(args.markdown, table + "\n", "--markdown")
        print(f"markdown written to {args.markdown}")
    if not result.rows:
        print("cstar-fx bench: nothing was measured; the reasons are under the table", file=sys.stderr)
        return 1
    return 0


def _check_outputs(args: argparse.Namespace) -> None:
    """--json and --markdown: writable, distinct, and never one of the command's input files."""
    inputs = {f"the ONNX file {path.name} to compare": path for path in args.onnx}
    inputs.update({"the --plan file": args.plan, "the --dense-weights file": args.dense_weights,
                   "the --weights file": args.weights})
    if args.json is not None:
        check_output(args.json, "--json", inputs=inputs, example="bench.json")
    if args.markdown is not None:
        check_output(args.markdown, "--markdown", inputs={**inputs, "the --json output": args.json},
                     example="bench.md")


def _check_onnx_file(path: Path) -> None:
    """Refuse, before timing anything, a file that is not an ONNX model (the benchmark would report it as not
    measured and print an empty table)."""
    if not path.is_file():
        raise UsageError(f"no ONNX file at {path}; pass files written by `cstar-fx export`")
    try:
        import onnx
    except ImportError:
        return  # the benchmark says which extra to install
    try:
        model = onnx.load(str(path), load_external_data=False)
        ok = len(model.graph.node) > 0 and len(model.graph.input) > 0
    except Exception:  # protobuf raises DecodeError and friends for a file that is not ONNX
        ok = False
    if not ok:
        raise UsageError(f"{path} is not an ONNX model; pass files written by `cstar-fx export` (or torch.onnx)")
