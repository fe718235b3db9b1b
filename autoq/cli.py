"""The `autoq` command line. Thin: parses arguments, loads the run file, calls the library, prints.

    autoq tune RUN.toml [--strategy NAME] [--storage URL] [--trials N] [--timeout S] [--out DIR]
                        [--quiet] [--measure-lock]
    autoq resume RUN.toml [same options]        continue the run's study (an error if it has none)
    autoq report [RUN.toml] [--study NAME] [--storage URL] [--out DIR]
    autoq bench MODEL.autoq --run RUN.toml [--seconds S] [--threads N] [--trusted]
    autoq export MODEL.autoq --run RUN.toml --out DIR [--trusted]
    autoq strategies                             list the strategy presets
    autoq dispatch bench [--out TABLE.json] [--suite SHAPES.toml] [--threads N] [--limit N]
    autoq dispatch show TABLE.json
    autoq dispatch export --study NAME [--storage URL] --out TABLE.json
    autoq dispatch apply MODEL.autoq TABLE.json|shipped --run RUN.toml --out NEW.autoq [--trusted]

A model file holds data only (plan, int8 numbers): commands that open one rebuild it on the FP32 model
the run file names (--run). --trusted also opens autoq's old pickled files, which run code when opened.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import optuna
import torch

from autoq.config import load_strategy, strategies
from autoq.deploy import MANIFEST, export
from autoq.dispatch.apply import apply_dispatch
from autoq.dispatch.measured import LayerTimer
from autoq.dispatch.rule import DEPTH, Measurement
from autoq.dispatch.suite import PASSES, SECONDS_PER_SHAPE, bench_table, load_suite
from autoq.dispatch.table import DispatchTable
from autoq.files import write_atomic
from autoq.measure.latency import measure_latency, speedup
from autoq.model_file import synthetic_inputs
from autoq.result import load, save
from autoq.run import load_run, prepare
from autoq.run.sources import load_model
from autoq.search.study import layer_timings, redacted, storage_url

RESULT_FILE = "result.json"  # in a run's output folder: the study it used and the outcome


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="autoq", description="Accuracy-aware int8 tuning for x86 CPUs.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("tune", "tune the model a run file describes (continues its study if there is one)"),
                       ("resume", "continue a run file's study after a stop or a kill (an error if it has none)")):
        run = commands.add_parser(name, help=text)
        run.add_argument("run", help="run file (TOML)")
        run.add_argument("--strategy", help=f"strategy preset, replacing the run file's: {', '.join(strategies())}")
        run.add_argument("--storage", help="Optuna storage URL (e.g. postgresql+psycopg://user@host/db), "
                                           "replacing the run file's")
        run.add_argument("--trials", type=int, help="total trials of the study (n_trials)")
        run.add_argument("--timeout", type=float, help="seconds of search in this call")
        run.add_argument("--out", help="output folder (default: the run file's `output`)")
        run.add_argument("--quiet", action="store_true", help="print only the final summary (no progress)")
        run.add_argument("--measure-lock", action="store_true",
                         help="take turns with the other workers on this machine when timing")

    report = commands.add_parser("report", help="write the HTML + PNG report of a study (running or finished)")
    report.add_argument("run", nargs="?", help="run file whose finished run's study to report")
    report.add_argument("--study", help="study name (default: the run's, or the storage's only study)")
    report.add_argument("--storage", help="Optuna storage URL (default: the run file's, or autoq-runs/autoq.db)")
    report.add_argument("--out", help="output folder (default: the run's output folder, or ./autoq-report)")

    bench = commands.add_parser("bench", help="measure a saved int8 model's latency (and, with --run, "
                                              "its metric and speedup over the FP32 model)")
    _model_file_arguments(bench, run_help="run file naming the FP32 model the file was tuned from (its numbers "
                                          "are rebuilt on it); the int8 model is compared with it on its data")
    bench.add_argument("--seconds", type=float, default=3.0, help="timing effort (default: %(default)s)")
    bench.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")

    export = commands.add_parser("export", help="write a saved int8 model as a folder that plain PyTorch runs "
                                                "(TorchScript or AOTInductor, with run.py)")
    _model_file_arguments(export)
    export.add_argument("--out", required=True, help="folder to write (replaced if it is an earlier export)")

    commands.add_parser("strategies", help="list the strategy presets and their settings")
    _dispatch_parser(commands)

    args = parser.parse_args(argv)
    handlers = {"tune": _tune, "resume": _tune, "report": _report, "bench": _bench_model, "export": _export_model,
                "strategies": _strategies, "dispatch": _dispatch}
    try:
        handlers[args.command](args)
    except (ValueError, TimeoutError) as error:  # TimeoutError: the measurement lock
        print(f"autoq: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoq: stopped. Finished trials are kept; the same command (or `autoq resume RUN.toml`) "
              "continues the study.", file=sys.stderr)
        return 130
    return 0


def _tune(args: argparse.Namespace) -> None:
    import autoq

    spec = load_run(args.run, strategy=args.strategy, storage=args.storage, n_trials=args.trials,
                    timeout=args.timeout, verbose=False if args.quiet else None,
                    measure_lock=True if args.measure_lock else None,
                    resume=True if args.command == "resume" else None)
    output = Path(args.out) if args.out else spec.output
    job = prepare(spec)
    result = autoq.tune(job.model, job.example_inputs, job.calib, eval_data=job.eval_data, metric=job.metric,
                        config=spec.tune, train_data=job.train, loss_fn=job.loss_fn)
    output.mkdir(parents=True, exist_ok=True)
    result.save(output / "model.autoq", model_source=f"the run file {spec.path}")
    if result.dispatch_table is not None and result.dispatch_table.entries:
        result.dispatch_table.save(output / "dispatch-table.json")
    write_atomic(output / RESULT_FILE, json.dumps({
        "run": str(spec.path), "study": result.study_name, "storage": result.storage,
        "feasible": result.feasible, "accuracy": result.accuracy, "baseline_accuracy": result.baseline_accuracy,
        "loss": result.loss, "speedup": result.speedup, "latency_ms": result.latency_ms, "plan": result.plan,
    }, indent=2))
    paths = _write_report(storage_url(spec.tune.storage), result.study_name, output)  # not the redacted one
    if args.quiet:
        print(result.summary())
    print(f"wrote {output / 'model.autoq'}, {paths['html']}")


def _report(args: argparse.Namespace) -> None:
    storage, study_name, output = args.storage, args.study, Path(args.out) if args.out else None
    if args.run:
        spec = load_run(args.run)
        storage = storage or spec.tune.storage
        output = output or spec.output
        recorded = spec.output / RESULT_FILE
        if study_name is None and recorded.is_file():
            study_name = json.loads(recorded.read_text())["study"]
    url = storage_url(storage)
    names = optuna.get_all_study_names(url)
    if study_name is None:
        if len(names) != 1:
            raise ValueError(f"{redacted(url)} holds {len(names)} studies {names}: name one with --study.")
        study_name = names[0]
    if study_name not in names:
        raise ValueError(f"no study named {study_name!r} in {redacted(url)}; it holds {names}.")
    paths = _write_report(url, study_name, output or Path("autoq-report"))
    print(f"wrote {paths['html']}")


def _write_report(url: str, study_name: str, output: Path) -> dict[str, Path]:
    from autoq.report import write_report

    return write_report(optuna.load_study(study_name=study_name, storage=url), output)


def _model_file_arguments(parser: argparse.ArgumentParser,
                          run_help: str = "run file naming the FP32 model the file was tuned from") -> None:
    """The model file a command opens, and what opening it needs."""
    parser.add_argument("model", help="model file written by autoq tune / TuneResult.save / autoq.save")
    parser.add_argument("--run", help=run_help + " (required: a model file holds numbers, not code)")
    parser.add_argument("--trusted", action="store_true",
                        help="also open a model file of autoq's old pickled format, which runs code stored in it")


def _open_model(args: argparse.Namespace, fp32: torch.nn.Module | None = None) -> torch.nn.Module:
    """The int8 model of `args.model`, rebuilt on `fp32` or else on the FP32 model `args.run` names."""
    if fp32 is None and args.run:
        spec = load_run(args.run, verbose=False)
        fp32 = load_model(spec.model, spec.base)
    return load(args.model, fp32, trusted=args.trusted)


def _bench_model(args: argparse.Namespace) -> None:
    job = prepare(load_run(args.run, verbose=False)) if args.run else None
    model = _open_model(args, job.model if job else None)
    if job is not None:
        inputs = job.example_inputs
        models = {"fp32": job.model, "int8": model}
    else:
        inputs = synthetic_inputs(model.meta["autoq"]["inputs"])
        models = {"int8": model}
    timing = measure_latency(models, inputs, threads=args.threads, target_seconds=args.seconds, min_repeats=20)
    shapes = ", ".join(str(tuple(value.shape)) for value in inputs)
    print(f"{'model':6s} {'median ms':>10s} {'p10 ms':>8s} {'p90 ms':>8s}"
          + (f" {'metric':>8s} {'speedup':>8s}" if job else "") + f"   inputs {shapes}, "
          f"{torch.get_num_threads() if args.threads is None else args.threads} threads")
    for name, stats in timing.items():
        line = f"{name:6s} {stats.median_ms:10.3f} {stats.p10_ms:8.3f} {stats.p90_ms:8.3f}"
        if job:
            line += f" {job.score(models[name]):8.4f} {speedup(timing['fp32'], stats):7.2f}x"
        print(line)


def _export_model(args: argparse.Namespace) -> None:
    model = _open_model(args)
    written = export(model, args.out)
    print(f"wrote {written.directory}/: {written.model_file.name} ({written.format}, "
          f"{written.size_bytes / 1e6:.1f} MB), run.py, {MANIFEST}")


def _strategies(args: argparse.Namespace) -> None:
    for name in strategies():
        print(f"{name}: {json.dumps(load_strategy(name), sort_keys=True)}")


def _dispatch_parser(commands: argparse._SubParsersAction) -> None:
    dispatch = commands.add_parser("dispatch", help="per-layer int8 kernel dispatch tables (FBGEMM vs oneDNN)")
    actions = dispatch.add_subparsers(dest="action", required=True)

    bench = actions.add_parser("bench", help="time the shape suite under both libraries; write a table for this CPU")
    bench.add_argument("--out", default="dispatch-table.json", help="table to write (default: %(default)s)")
    bench.add_argument("--suite", default=None, help="shape suite TOML (default: the shipped kernels/shapes.toml)")
    bench.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    bench.add_argument("--limit", type=int, default=None, help="time only the first N shapes of the suite")
    bench.add_argument("--max-depth", type=int, default=DEPTH, help="depth of the learned rule's tree")
    bench.add_argument("--seconds", type=float, default=SECONDS_PER_SHAPE,
                       help="timing effort per shape in seconds (default: %(default)s)")
    bench.add_argument("--passes", type=int, default=PASSES, help="times the suite is timed over (default: %(default)s)")
    bench.add_argument("--quiet", action="store_true", help="no per-shape progress")

    show = actions.add_parser("show", help="print a table's CPU, learned rule and held-out accuracy")
    show.add_argument("table")

    export = actions.add_parser("export", help="write the per-layer timings a tuning study measured as a table")
    export.add_argument("--study", required=True, help="study name (TuneResult.study_name)")
    export.add_argument("--storage", default=None, help="Optuna storage URL (default: autoq-runs/autoq.db)")
    export.add_argument("--out", required=True, help="table to write")

    apply = actions.add_parser("apply", help="re-pack a saved int8 model's layers per a table (no re-tuning)")
    _model_file_arguments(apply)
    apply.add_argument("table", help="dispatch table JSON, or 'shipped' for autoq's table for this CPU")
    apply.add_argument("--out", required=True, help="model file to write")


def _dispatch(args: argparse.Namespace) -> None:
    if args.action == "apply":
        _apply(args)
        return
    table = {"bench": _bench, "show": _show, "export": _export}[args.action](args)
    print(describe(table))

def _bench(args: argparse.Namespace) -> DispatchTable:
    shapes = load_suite(args.suite)[: args.limit]

    def progress(done: int, total: int, entry: Measurement | None) -> None:
        if args.quiet:
            return
        if entry is None:  # an earlier pass: no final timing yet
            print(f"\r[{done:4d}/{total}] timing the suite", end="", file=sys.stderr)
        else:
            timings = "  ".join(f"{lib} {us:8.1f} us" for lib, us in entry.micros.items())
            print(f"\r[{done:4d}/{total}] {entry.shape.key():60s} {timings}  -> {entry.fastest}", file=sys.stderr)

    table = bench_table(shapes, threads=args.threads, max_depth=args.max_depth, seconds=args.seconds,
                        passes=args.passes, progress=progress)
    table.save(args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return table


def _show(args: argparse.Namespace) -> DispatchTable:
    return DispatchTable.load(args.table)


def _export(args: argparse.Namespace) -> DispatchTable:
    try:
        study = optuna.load_study(study_name=args.study, storage=storage_url(args.storage))
    except KeyError as error:
        raise ValueError(f"no study named {args.study!r} in {redacted(storage_url(args.storage))}") from error
    stored = layer_timings(study)
    if not stored:
        raise ValueError(f"study {args.study!r} measured no per-layer kernel timings (no 'measured' trial ran).")
    table = DispatchTable.for_this_machine(LayerTimer(stored).entries())
    table.refit()
    table.save(args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return table


def _apply(args: argparse.Namespace) -> None:
    model = _open_model(args)
    engines = apply_dispatch(model, args.table)
    save(model, args.out)
    onednn = sum(library == "onednn" for library in engines.values())
    print(f"wrote {args.out}: {onednn} layers on oneDNN, {len(engines) - onednn} on FBGEMM")


def describe(table: DispatchTable) -> str:
    """A dispatch table in a few lines: CPU, size, learned rule, held-out accuracy."""
    wins = sum(entry.fastest == "onednn" for entry in table.entries.values())
    lines = [
        f"dispatch table for {table.cpu.describe()}",
        f"  torch {table.torch_version}, {table.threads} threads, created {table.created or '?'}",
        f"  {len(table.entries)} measured shapes: oneDNN faster on {wins}, FBGEMM on {len(table.entries) - wins}",
    ]
    ceiling = table.int8_over_fp32()
    if ceiling:
        lines.append("  int8 (faster library) over FP32 (PyTorch's faster float kernel), layers alone: " + "; ".join(
            f"{kind} {mean:.2f}x geomean ({low:.2f}-{high:.2f}x, {n} shapes)"
            for kind, (mean, low, high, n) in ceiling.items()))
    if table.rule is not None:
        heldout = table.rule.heldout
        if heldout:
            lines.append(
                f"  learned rule, {heldout['splits']} random splits with {heldout['shapes']} shapes held out: "
                f"within {heldout['tolerance']:.0%} of the faster library for {heldout['within_tolerance']:.1%} of "
                f"held-out shapes (worst split {heldout['worst_split']:.1%}; PyTorch's x86 rule {heldout['x86_rule']:.1%})")
        lines.append("  rule:")
        lines += ["    " + line for line in table.rule.text().splitlines()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
