"""The command line (contract): run, report, inspect, data fetch."""
from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
from pathlib import Path

from optstate import __version__
from optstate.errors import UserError

EPILOG = "Documentation: README.md and docs/ in the optstate repository."


def _study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", nargs="?", help="study file (TOML); default: the embedded preset")
    p.add_argument("--preset", help="embedded (default), smoke, seed, seed-faithful")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a study key with a TOML value, e.g. --set seeds=2, "
                        "--set 'arms=[\"onecycle/keep\"]', --set optimizer.weight_decay=0.01")
    p.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="MODULE",
                   help="import MODULE (a module name or a .py file) before reading the arms, so that its "
                        "@register(...) handoffs can be used; recorded in the study's `plugins`")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", help="where datasets are kept (default: $OPTSTATE_DATA, else ~/.cache/optstate)")
    p.add_argument("--mirror", help="host to download archives from instead of fast.ai's (or $OPTSTATE_MIRROR)")


def _target_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", type=float, default=0.95, metavar="FRACTION",
                   help="time to target: epochs until validation top-1 reaches FRACTION of the best arm's mean "
                        "final (default 0.95); analysis only, not part of the study")


def _check_target(args) -> None:
    if not 0 < args.target <= 1:
        raise UserError(f"--target must be a fraction in (0, 1], got {args.target}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="optstate", epilog=EPILOG,
                                 description="Is it fine to throw the optimizer away between training sessions?")
    ap.add_argument("--version", action="version", version=f"optstate {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a study (default: the embedded study)", epilog=EPILOG)
    _study_args(run)
    run.add_argument("--out", help="run directory (default: runs/<study name>); rerunning resumes")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    run.add_argument("--executor", choices=["local", "ray"], default="local",
                     help="local (default): nodes one after another in this process; ray: each node a Ray task "
                          "(pip install 'optstate[ray]'); --out must be on storage every worker sees")
    run.add_argument("--address", help="ray: the cluster to join (e.g. auto, or ray://host:10001); "
                                       "default: start a local Ray instance for this run")
    run.add_argument("--gpus-per-run", type=float, default=1.0, metavar="N",
                     help="ray on CUDA: GPUs each task asks for; fractions share a GPU (default 1)")
    run.add_argument("--cpus-per-run", type=float, metavar="N",
                     help="ray: CPUs each task asks for (default: 1 with GPUs; on CPUs, the driver's PyTorch thread "
                          "count, which every task trains with so that the numbers match the local executor's)")
    run.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                     help="auto (default): bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), "
                          "else fp32; a run directory keeps the precision it was started with")
    run.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    run.add_argument("--no-download", action="store_true", help="never download datasets; fail if missing")
    run.add_argument("--max-bad-images", type=float, default=0.01, metavar="FRACTION",
                     help="image files that cannot be decoded are left out and listed; above this fraction of a "
                          "folder's files the run stops instead (default 0.01)")
    run.add_argument("--keep-checkpoints", action="store_true",
                     help="keep every node's final checkpoint and one checkpoint per epoch (default: only those "
                          "that sessions still to train need)")
    _data_args(run)
    _target_arg(run)

    rep = sub.add_parser("report", help="rebuild results.json, figures, report.md and report.html from a run directory")
    rep.add_argument("dir")
    _target_arg(rep)

    ins = sub.add_parser("inspect", help="print an optimizer's param_groups and state around each handoff")
    _study_args(ins)
    ins.add_argument("--arm", default="onecycle/keep", help="arm to follow (default onecycle/keep)")
    ins.add_argument("--steps", type=int, default=6, help="steps per session (default 6)")

    b = sub.add_parser("bench", epilog=EPILOG,
                       help="time the original notebooks' loop, optstate's training path and the model alone, "
                            "side by side")
    b.add_argument("--model", default="resnet50")
    b.add_argument("--image-size", type=int, default=128)
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--steps", type=int, default=10, help="steps per timed block (default 10)")
    b.add_argument("--blocks", type=int, default=3, help="timed blocks per variant, alternating (default 3)")
    b.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    b.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="optstate's and the bound's precision, as `optstate run --precision` (default auto)")
    b.add_argument("--compile", action="store_true", help="torch.compile optstate's and the bound's model")
    b.add_argument("--optimizer", default="adam")
    b.add_argument("--data", type=Path, metavar="DIR",
                   help="an image folder (train/<class>/, val/<class>/) to read instead of generated JPEGs")
    b.add_argument("--log-every", type=int, default=10, help="state diagnostics every N steps, as a study's log_every")
    b.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")

    data = sub.add_parser("data", help="datasets")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION")
    fetch = dsub.add_parser("fetch", help="download, verify and extract Imagenette or Imagewoof")
    fetch.add_argument("name", choices=["imagenette", "imagewoof"])
    fetch.add_argument("--size", choices=["160", "320", "full"], default="160")
    fetch.add_argument("--accept-md5", metavar="MD5",
                       help="also accept this checksum (an archive re-uploaded since this release, from a source you "
                            "trust); classes and image counts are still checked. For `optstate run`: "
                            "$OPTSTATE_ACCEPT_MD5")
    _data_args(fetch)
    return ap


def _run(args) -> int:
    from optstate import study as studies
    from optstate.execute import run_study
    from optstate.report import build_report

    _check_target(args)
    if not 0 <= args.max_bad_images <= 1:
        raise UserError(f"--max-bad-images must be a fraction in [0, 1], got {args.max_bad_images}")
    study = studies.load(args.study, args.preset, args.sets, args.plugins)
    out = Path(args.out or f"runs/{study.name}")
    run_study(study, out, device=args.device, data_root=args.data_root,
              download=not args.no_download, mirror=args.mirror, keep_checkpoints=args.keep_checkpoints,
              precision=args.precision, compile=args.compile, executor=_executor(args),
              max_bad_images=args.max_bad_images)
    results = build_report(out, args.target)
    print("")
    for line in results["answer"]:
        print(line)
    if results["comparisons"] and all(c["n"] == 1 for c in results["comparisons"]):
        print("(one seed per arm: no error bars; --set seeds=3 measures the spread)")
    print(f"\nreport: {out / 'report.md'} (and report.html)   figures: {out / 'figures'}   "
          f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}")
    return 0


def _executor(args):
    from optstate.execute import Executor

    if args.executor == "local" and (args.address or args.gpus_per_run != 1.0 or args.cpus_per_run is not None):
        raise UserError("--address, --gpus-per-run and --cpus-per-run belong to --executor ray")
    if not args.gpus_per_run > 0 or not (args.cpus_per_run is None or args.cpus_per_run > 0):
        raise UserError("--gpus-per-run and --cpus-per-run must be positive")
    return Executor(args.executor, args.address, args.gpus_per_run, args.cpus_per_run)


def _report(args) -> int:
    from optstate.report import build_report

    _check_target(args)
    out = Path(args.dir)
    if not out.is_dir():
        raise UserError(f"{out} is not a directory")
    try:
        build_report(out, args.target)
    except (ValueError, KeyError) as e:  # a hand-edited or truncated CSV
        raise UserError(f"{out}: a metrics file is damaged ({type(e).__name__}: {e})") from None
    print(f"rebuilt {out / 'results.json'}, {out / 'report.md'}, {out / 'report.html'} and {out / 'figures'}")
    return 0


def _inspect(args) -> int:
    from optstate import study as studies
    from optstate.review import review

    study = studies.load(args.study, args.preset, args.sets, args.plugins)
    if args.arm not in study.arms:
        raise UserError(f"--arm {args.arm!r} is not one of the study's arms ({', '.join(study.arms)})")
    if args.steps < 1:
        raise UserError("--steps must be at least 1")
    review(study, args.arm, args.steps)
    return 0


def _bench(args) -> int:
    from optstate.bench import bench
    from optstate.study import optimizer_class

    optimizer_class(args.optimizer)  # a clear error for an unknown name
    bench(args.model, args.image_size, args.batch_size, args.steps, args.blocks, args.device, args.precision,
          args.compile, args.optimizer, args.data, args.log_every, args.json)
    return 0


def _fetch(args) -> int:
    from optstate.data import data_root, fetch

    archive = fetch.archive_for(args.name, None if args.size == "full" else args.size)
    root = data_root(args.data_root)
    path = fetch.fetch(archive, root, mirror=args.mirror, accept_md5=args.accept_md5)
    print(f"{archive.dataset}: verified at {path}")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler, `kill`, a container stop): stop as cleanly as on Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
        threading.excepthook = _on_thread_error
    args = parser().parse_args(argv)
    if args.command is None:
        args = parser().parse_args(["run", *(argv or [])])
    handlers = {"run": _run, "report": _report, "inspect": _inspect, "bench": _bench}
    try:
        if args.command == "data":
            if args.data_command != "fetch":
                raise UserError("`optstate data` needs an action: `optstate data fetch imagenette --size 160`")
            return _fetch(args)
        return handlers[args.command](args)
    except UserError as e:
        print(f"optstate: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # e.g. `optstate inspect | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as e:
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"\noptstate: {how}; finished sessions and epochs are kept: rerun the same command to continue.",
              file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except OSError as e:  # an unwritable --out, a full disk, a file where a folder should be
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {e.filename}" if e.filename else ""
            print(f"optstate: error: the disk is full (no space left{where}). Files written before are intact and "
                  f"a file being replaced keeps its previous version; free some space and rerun the same command "
                  f"to continue.", file=sys.stderr)
        else:
            print(f"optstate: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a fault of optstate's own: one line for the user, the trace in a file
        return _internal_error(e)


def _on_thread_error(args) -> None:
    """A background thread's OSError (TensorBoard's writer on a full disk) is raised again in the
    main thread, which reports it in one line; the thread's own traceback would only be noise.
    Anything else is a fault of optstate's: one line, the trace in a file."""
    if issubclass(args.exc_type, OSError) or args.exc_value is None:
        return
    _internal_error(args.exc_value, f" in a background thread ({args.thread.name if args.thread else '?'})")


def _internal_error(e: BaseException, context: str = "") -> int:
    import tempfile
    import traceback

    trace = "".join(traceback.format_exception(e))
    try:
        fd, path = tempfile.mkstemp(prefix="optstate-crash-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(f"optstate {__version__}\nargv: {sys.argv}\n\n{trace}")
        where = f"the traceback is in {path}"
    except OSError:
        where = "the traceback could not be saved"
    print(f"optstate: internal error{context}: {type(e).__name__}: {e}; finished sessions are kept. This is a bug in "
          f"optstate: please report it with the file ({where}).", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
