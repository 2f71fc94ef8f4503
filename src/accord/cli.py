"""Command line: ``accord {train,list,demo}``. Only this module prints."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from . import algorithms, bench, report
from .run import rundir, settings
from .run.config import ConfigError, TrainConfig, apply_settings, load_plugins
from .run.failures import one_line
from .run.launch import launch, launched_here, under_torchrun
from .run.metrics import read_metrics
from .run.real_links import check_real_links, launch_real
from .run.train import resume_plan, run_worker
from .run.validation import check_writable, validate

PROG = "accord"


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one algorithm on one task with N workers",
                       description="Train with N gloo workers on localhost (or under torchrun).")
    settings.add_arguments(p, TrainConfig)  # one option per declared setting
    p.add_argument("--overwrite", action="store_true",
                   help="--out may hold an earlier run: remove its metrics.jsonl, logs/ and "
                        "tensorboard/ first")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="algorithm hyperparameter, or a training setting the algorithm does "
                        "not define; prefix algo. or train. to choose")


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = settings.from_args(TrainConfig, args)
    load_plugins(cfg)
    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if args.workers is not None and args.workers != world:
            raise ConfigError(f"workers: got {args.workers}, but torchrun started {world} "
                              "processes; allowed: omit --workers or pass the same number")
        cfg.workers = world
    try:
        algorithms.get(cfg.algo)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    apply_settings(cfg, args.set)
    return cfg


#: exit status of `accord train` per run status
EXIT_CODES = {"ok": 0, "failed": 1, "diverged": 3, "interrupted": 130}


def cmd_train(args: argparse.Namespace) -> int:
    rank = int(os.environ.get("RANK", "0")) if under_torchrun() else 0
    driver = rank == 0 and not launched_here()  # checks and locks the run directory
    try:
        cfg = _config_from_args(args)
        if args.overwrite and cfg.resume is not None:
            raise ConfigError(f"overwrite: got --overwrite with --resume {cfg.resume}; "
                              "allowed: one of them (--resume continues the run in --out, "
                              "--overwrite clears it first)")
        # the run directory is created last: a refused run leaves none behind
        validate(cfg, check_out=False)
        if driver:
            if cfg.resume is None:
                rundir.prepare(cfg.out, args.overwrite)
            else:  # the run directory holds the run to continue
                note, todo = resume_plan(cfg)
                if note:
                    print(f"{PROG} train: {note}", file=sys.stderr)
                if not todo and not under_torchrun():
                    return 0  # (under torchrun every rank learns it from rank 0)
        check_writable(cfg.out)
        hosts = None if under_torchrun() else check_real_links(cfg)
    except ConfigError as e:
        if rank == 0:  # under torchrun every rank validates; one line is enough
            print(f"{PROG} train: error: {e}", file=sys.stderr)
        return 2
    if cfg.fault_tolerant and os.environ.get("ACCORD_FT_REPLICA") is not None:
        from .ft.launcher import ft_worker_main  # a worker of the fault-tolerant launcher

        os._exit(ft_worker_main(cfg))
    if under_torchrun():
        os._exit(_torchrun_worker(cfg, rank, driver))
    if cfg.fault_tolerant:
        from .ft.launcher import ft_launch

        result = ft_launch(cfg)
    elif hosts is not None:
        print(f"{PROG} train: real links: {hosts.describe()}", file=sys.stderr)
        result = launch_real(cfg)
    else:
        result = launch(cfg)
    path = Path(cfg.out) / "metrics.jsonl"
    records = read_metrics(path) if path.exists() else []
    summary = records[-1] if records and records[-1].get("type") == "summary" else None
    if result.returncode != 0:
        print(f"{PROG} train: error: {result.message}", file=sys.stderr)
        return result.returncode
    if summary is None:
        print(f"{PROG} train: error: the run left no summary in {path}", file=sys.stderr)
        return 1
    if summary["status"] == "diverged":
        print(f"{PROG} train: diverged at step {summary.get('diverged_step')}: "
              f"{summary.get('diverged_reason')} (metrics: {path})", file=sys.stderr)
        return EXIT_CODES["diverged"]
    print(_format_summary(cfg, summary))
    if cfg.fault_tolerant:
        print(f"fault-tolerant: {summary.get('discarded_steps', 0)} steps discarded, "
              f"{summary.get('respawns', 0)} respawns, participants at the end "
              f"{summary.get('participants')}")
    return 0


def cmd_ft_lighthouse(args: argparse.Namespace) -> int:
    from .ft.launcher import serve_lighthouse

    try:
        return serve_lighthouse(args.min_workers, args.bind)
    except ConfigError as e:
        print(f"{PROG} ft-lighthouse: error: {e}", file=sys.stderr)
        return 2


def cmd_ft_merge(args: argparse.Namespace) -> int:
    from .ft.launcher import merge_hosts

    try:
        summary = merge_hosts(Path(args.out), [Path(d) for d in args.hosts])
    except ConfigError as e:
        print(f"{PROG} ft-merge: error: {e}", file=sys.stderr)
        return 2
    print(f"{PROG} ft-merge: {Path(args.out) / 'metrics.jsonl'}: status {summary['status']}, "
          f"{summary['steps']} steps, participants at the end {summary['participants']}")
    return 0 if summary["status"] == "ok" else 1


def _torchrun_worker(cfg: TrainConfig, rank: int, driver: bool) -> int:
    """One worker under torchrun: its exit status, with one line on the terminal from a
    failing rank (the traceback is in its logs/rank<r>.traceback) and the same line in
    torchrun's error file, which torchrun prints as the root cause."""
    lock = rundir.RunLock(cfg.out) if driver else None
    # outside the run itself (which turns SIGTERM into an interruption) a SIGTERM from
    # torchrun, stopping the survivors of a crashed peer, waits for the lock's release
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN) if driver else None
    try:
        if lock is not None:
            lock.acquire()
        summary = run_worker(cfg) or {}
        code = 0 if summary.get("nothing_to_do") else EXIT_CODES.get(summary.get("status", "ok"), 0)
    except ConfigError as e:
        print(f"{PROG} train: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = EXIT_CODES["interrupted"]
    except BaseException as exc:  # noqa: BLE001 - reported in one line, traceback on disk
        message = one_line(exc)
        line = (f"{PROG} train: error: rank {rank}: {message} (traceback: "
                f"{Path(cfg.out) / 'logs' / f'rank{rank}.traceback'})")
        if not launched_here():  # the local launcher prints the run's one line itself
            print(line, file=sys.stderr)
        _torchrun_error_file(line)
        code = EXIT_CODES["failed"]
    finally:
        if lock is not None:
            lock.release()
            signal.signal(signal.SIGTERM, previous)
    # Leave without the interpreter's teardown: C++ destructors of finished gloo threads
    # can abort there ("terminate called without an active exception"), rarely, turning
    # a good run into a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _torchrun_error_file(message: str) -> None:
    """torchrun's error file (TORCHELASTIC_ERROR_FILE), which it prints as the failure's
    message instead of "<N/A>"."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": message,
                                   "extraInfo": {"timestamp": str(int(time.time()))}}}, f)
    except OSError:
        pass


def _format_summary(cfg: TrainConfig, s: dict) -> str:
    parts = [f"{cfg.algo} on {cfg.task} x{cfg.workers}: {s['steps']} steps in {s['time_s']:.1f}s"]
    parts += [f"{k} {v:.4g}" for k, v in s.items() if k.startswith("eval_") and v is not None]
    parts.append(f"sent {s['comm_bytes'] / 1e6:.2f} MB/worker in {s['comm_calls']} calls")
    return ", ".join(parts) + f"\nmetrics: {Path(cfg.out) / 'metrics.jsonl'}"


def _plugins(args: argparse.Namespace) -> list[str]:
    """``--plugin`` modules, loaded here (ConfigError, one line, for one that fails)."""
    plugins = [algorithms.absolute_spec(s) for s in getattr(args, "plugins", None) or []]
    try:
        algorithms.load_plugins(plugins)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return plugins


def capabilities(cls: type) -> str:
    """What an algorithm's class declares, in words (``accord list -v``)."""
    compress = ("bf16, fp16, powersgd, int8, int4, topk" if cls.low_rank else "bf16, fp16") \
        if cls.compressible else "no"
    return (f"phase {cls.phase}; --compress {compress}; DDP hook "
            f"{cls.ddp_hook_form or 'no'}; --fault-tolerant "
            f"{cls.fault_tolerant or 'refused: ' + cls.ft_refusal}")


def cmd_list(args: argparse.Namespace) -> int:
    try:
        _plugins(args)
    except ConfigError as e:
        print(f"{PROG} list: error: {e}", file=sys.stderr)
        return 2
    rows = algorithms.list_algorithms()
    width = max(map(len, rows))
    for name, desc in rows.items():
        print(f"{name:<{width}}  {desc}")
        if args.verbose:
            cls = algorithms.get(name)
            print(f"{'':<{width}}    {capabilities(cls)}")
            for key, h in cls.hyperparameters.items():
                print(f"{'':<{width}}    {key}={h.default!r}  ({h.allowed()}) {h.help}")
    return 0


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{name}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{name}: got no values")
    return values


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a matrix of algorithms x tasks x workers x seeds",
                       description=bench.__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None,
                   help=f"one of: {', '.join(bench.preset_names())}")
    p.add_argument("--algos", default="", help="comma-separated algorithms (custom matrix)")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=ALGO[:K=V,...]",
                   help="an algorithm with hyperparameters under its own label")
    p.add_argument("--tasks", default=None,
                   help="comma-separated tasks (custom matrix, default digits; with --preset: "
                        "keep only these)")
    p.add_argument("--workers", default=None,
                   help="comma-separated worker counts (custom default 4; filters a preset)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds (custom default 0; filters a preset)")
    p.add_argument("--steps", type=int, default=None,
                   help="custom matrix: steps per run (default 200; a preset sets its own)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="applied to every run, as in `accord train --set`")
    p.add_argument("--fault", action="append", default=[], metavar="SPEC",
                   help="inject a fault into every run, as `accord train --fault` (repeat "
                        "for several); named in each run's label")
    p.add_argument("--plugin", action="append", default=[], dest="plugins",
                   metavar="MODULE|FILE.py",
                   help="import a module that registers algorithms, in the bench and in every "
                        "run (repeatable), as `accord train --plugin`")
    p.add_argument("--tune", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="tune KEY (any --set key; repeat for a grid) per arm on the tuning "
                        "seeds, each point judged by its mean over them on the validation "
                        "split, then run the seeds at each arm's best; results go to "
                        "OUT/<preset>-tuned")
    p.add_argument("--tune-seeds", default=None, metavar="S1,S2,...",
                   help="the seeds of the tuning runs (default "
                        f"{','.join(map(str, bench.TUNE_SEEDS))}; not evaluation seeds)")
    p.add_argument("--tune-seed", type=int, default=None, metavar="S",
                   help="one tuning seed: the same as --tune-seeds S")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--tensorboard", action="store_true",
                   help="every run also writes TensorBoard event files to its "
                        "RUN_DIR/tensorboard, as `accord train --tensorboard`")


#: steps per run of a custom matrix without --steps
CUSTOM_STEPS = 200


def _tune_seeds(args: argparse.Namespace) -> tuple[list[int], str | None]:
    """The tuning seeds and the flag that gave them (None: the default)."""
    one, many = getattr(args, "tune_seed", None), getattr(args, "tune_seeds", None)
    if one is not None and many is not None:
        raise ConfigError("--tune-seed and --tune-seeds given together; allowed: one of them "
                          "(--tune-seed S is --tune-seeds S)")
    if many is not None:
        return bench.parse_tune_seeds(many), "--tune-seeds"
    if one is not None:
        return bench.check_tune_seeds([one], "--tune-seed"), "--tune-seed"
    return list(bench.TUNE_SEEDS), None


def _bench_specs(args: argparse.Namespace
                 ) -> tuple[list[bench.RunSpec], dict[str, list[str]], list[int]]:
    """The runs asked for, the tuning grid (empty: no tuning) and the tuning seeds."""
    tune_seeds, seeds_flag = _tune_seeds(args)
    tasks = [t for t in (args.tasks or "").split(",") if t.strip()] or None
    workers = _int_list(args.workers, "workers") if args.workers is not None else None
    seeds = _int_list(args.seeds, "seeds") if args.seeds is not None else None
    specs = []
    if args.preset:
        specs = [s for s in bench.preset(args.preset)
                 if (tasks is None or s.task in tasks) and (workers is None or s.workers in workers)
                 and (seeds is None or s.seed in seeds)]
        if not specs:
            raise ConfigError(f"preset {args.preset!r}: no run matches the --tasks/--workers/"
                              "--seeds filters")
    plugins = _plugins(args)  # before any algorithm name is looked up
    algos = [a for a in args.algos.split(",") if a.strip()]
    steps = CUSTOM_STEPS if args.steps is None else args.steps
    if steps < 1:
        raise ConfigError(f"steps: got {steps}, allowed: an integer >= 1")
    if algos or args.variant or not args.preset:
        specs += bench.custom(algos, args.variant, tasks or ["digits"], workers or [4],
                              seeds or [0], steps)
    elif args.steps is not None:  # a preset's runs have their own steps: never ignore a flag
        raise ConfigError(f"steps: got {args.steps} with --preset {args.preset}, whose runs set "
                          "their own steps; allowed: --steps only with --algos or --variant (a "
                          "custom matrix)")
    try:
        specs = bench.apply_overrides(specs, args.set)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    specs = bench.apply_faults(specs, args.fault)
    if getattr(args, "tensorboard", False):  # not a --set key: it changes no result
        specs = [dataclasses.replace(s, train={**s.train, "tensorboard": True}) for s in specs]
    if plugins:  # each run's workers import them too
        specs = [dataclasses.replace(s, train={**s.train, "plugins": plugins}) for s in specs]
    grid = bench.parse_tune(getattr(args, "tune", []))
    if not grid and args.preset in bench.TUNED_PRESETS:
        grid = bench.TUNED_PRESETS[args.preset][1]
    if grid:
        specs = bench.tuned_groups(specs)
        bench.tuning_specs(specs, grid, tune_seeds, flag=seeds_flag or "--tune-seeds")
    elif seeds_flag:
        raise ConfigError(f"{seeds_flag}: nothing is tuned; allowed: with --tune or a tuned "
                          f"preset ({', '.join(bench.TUNED_PRESETS)})")
    return specs, grid, tune_seeds


def cmd_bench(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        specs, grid, tune_seeds = _bench_specs(args)
        configs = bench.plan(specs, out, create=False)
        if grid:  # every tuning run validated too, before any run starts
            bench.plan(bench.tuning_specs(specs, grid, tune_seeds), out, create=False)
        bench.check_out(out)  # last: a refused bench leaves no directory behind
    except ConfigError as e:
        print(f"{PROG} bench: error: {e}", file=sys.stderr)
        return 2
    try:
        if grid:
            configs, result, _ = bench.run_tuned(specs, grid, tune_seeds, out,
                                                 progress=not args.no_progress)
        else:
            result = bench.run_bench(configs, out, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"{PROG} bench: interrupted; run the same command again to resume",
              file=sys.stderr)
        return 130
    print()
    print(bench.summary_table(configs))
    groups = sorted({out / s.group for s in specs})
    print(f"\n{result.ran} runs done ({len(result.diverged)} diverged), {result.skipped} "
          f"reused, {len(result.failed)} failed"
          f" (log: {out / 'bench.jsonl'})")
    for g in groups:
        print(f"report: accord report {g}")
    return 1 if result.failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The quick preset, its report, and the final table."""
    args = argparse.Namespace(preset="quick", algos="", variant=[], tasks=None, workers=None,
                              seeds=None, steps=None, set=[], out=args.out, no_progress=False,
                              tune=[], tune_seed=None, tune_seeds=None)
    code = cmd_bench(args)
    if code == 0:
        path = report.write_report(Path(args.out) / "quick")
        print(f"report: {path}")
    return code


class _Parser(argparse.ArgumentParser):
    """Bad command-line syntax is one line too (argparse prints its usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        # argparse hands the value of --FLAG=-- on as [] (it reads '--' as the end of
        # options), which would reach the settings' parsers as a list (checked by the
        # command's parser, so the line names the command)
        for arg in [] if self.prog == PROG else sys.argv[1:] if args is None else args:
            if isinstance(arg, str) and arg.startswith("--") and arg.endswith("=--"):
                self.error(f"argument {arg[:-3]}: got '--', allowed: a value")
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _train_parser(sub)
    p = sub.add_parser("list", help="list algorithms with a one-line description")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also list capabilities and hyperparameters")
    p.add_argument("--plugin", action="append", default=[], dest="plugins",
                   metavar="MODULE|FILE.py", help="also list the algorithms this module "
                   "registers (repeatable)")
    _bench_parser(sub)
    report.add_parser(sub)
    p = sub.add_parser("demo", help="the quick comparison on digits, with its report")
    p.add_argument("--out", default="runs/demo")
    p = sub.add_parser("ft-lighthouse", help="serve the Lighthouse of a fault-tolerant run "
                       "on several hosts (needs accord[ft])")
    p.add_argument("--min-workers", type=int, default=1, metavar="M",
                   help="the fewest workers a step commits with (default 1)")
    p.add_argument("--bind", default="[::]:29510", metavar="HOST:PORT",
                   help="where to listen (default [::]:29510)")
    p = sub.add_parser("ft-merge", help="merge the run directories of the hosts of one "
                       "fault-tolerant run into one metrics.jsonl")
    p.add_argument("out", help="the merged run directory (created)")
    p.add_argument("hosts", nargs="+", metavar="HOST_DIR",
                   help="each host's --out directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    commands = {"train": cmd_train, "list": cmd_list, "bench": cmd_bench, "demo": cmd_demo,
                "report": report.run, "ft-lighthouse": cmd_ft_lighthouse,
                "ft-merge": cmd_ft_merge}
    return commands[args.command](args)
