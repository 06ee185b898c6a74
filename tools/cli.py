"""`iccl`: one command line with subcommands. Each subcommand lives in its own module with a
`register(subparsers)` function; heavy imports happen inside the handlers so `--help` is instant."""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from pipeline.errors import DataError
from pipeline.progress import set_quiet

# module -> what it adds; order is the order `iccl --help` lists them in.
COMMAND_MODULES = ("tools.cmd_data", "tools.cmd_train", "tools.cmd_predict", "tools.cmd_stage2",
                   "tools.cmd_reproduce", "tools.cmd_bench")


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (like every other error of `iccl`), exit 2, and
    `-q` accepted before and after the command (`iccl -q train ...` and `iccl train -q ...`):
    every subcommand parser is built by this class, and there `-q` leaves the attribute unset
    unless given, so the top level's value stands."""

    def __init__(self, *args, quiet_default=argparse.SUPPRESS, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("-q", "--quiet", action="store_true", default=quiet_default, help=QUIET_HELP)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


CLOSED_PIPE = 141  # 128 + SIGPIPE, as a shell reports `yes | head -1`'s producer

QUIET_HELP = ("no progress: no bars and no status lines on stderr. Results (tables, --json output, "
              "verify's findings) still go to stdout and errors to stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="iccl",
        description="Interpolative centroid contrastive learning (ICCL) for long-tailed recognition: "
                    "convert a dataset once, train both stages, evaluate, predict, export, and "
                    "measure throughput.",
        epilog="Run `iccl demo` for a complete run on built-in synthetic data, "
               "`iccl COMMAND --help` for the options of a command.",
        quiet_default=False,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `iccl` command; returns the exit status: 0 done, 1 a finding (verify found problems,
    predict met unreadable images), 2 a user-fixable error (one line on stderr naming the file or
    setting and the fix), 130 interrupted, 141 the reader of stdout went away."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 1
    set_quiet(args.quiet)
    try:
        status = int(args.handler(args) or 0)
        sys.stdout.flush()  # a closed pipe must show here, not in the interpreter's exit flush
        return status
    except DataError as e:
        return _fail(args, str(e))
    except BrokenPipeError:
        return _closed_stdout()
    except OSError as e:  # the filesystem refused (read-only, full, permissions): the user can fix it
        if e.errno == errno.EPIPE:
            return _closed_stdout()
        where = f"{e.filename}: " if e.filename else ""
        return _fail(args, f"{where}{e.strerror or e}. Check that the path is a writable folder "
                           f"(or readable file) with free space, then rerun the same command.")
    except KeyboardInterrupt:
        print(f"iccl {args.command}: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
    finally:
        set_quiet(False)  # `main` may be called again in the same process (tests, notebooks)
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun, leave the process group once, when the command ends, however it ends.
    Groups are only ever made by `train.distributed`, so a command that never loaded it has none
    (and stays free of the torch import)."""
    distributed = sys.modules.get("train.distributed")
    if distributed is not None:
        distributed.shutdown()


def _fail(args, message: str) -> int:
    print(f"iccl {args.command}: error: {message}", file=sys.stderr)
    return 2


def _closed_stdout() -> int:
    """The reader of our stdout went away (`iccl info DIR --json | head -1`): stop quietly, as the
    Python documentation's recipe for SIGPIPE does: point stdout at devnull so that the
    interpreter's final flush does not raise again, and exit 141 (128 + SIGPIPE: what a shell
    reports for a program a closed pipe stopped, and never mistaken for 1, a finding)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (tests capture it): nothing to flush
        pass
    return CLOSED_PIPE


if __name__ == "__main__":
    sys.exit(main())
