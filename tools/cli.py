"""`iccl`: one command line with subcommands. Each subcommand lives in its own module with a
`register(subparsers)` function; heavy imports happen inside the handlers so `--help` is instant."""
from __future__ import annotations

import argparse
import importlib
import sys

from pipeline.errors import DataError
from pipeline.progress import set_quiet

# module -> what it adds; order is the order `iccl --help` lists them in.
COMMAND_MODULES = ("tools.cmd_data", "tools.cmd_train", "tools.cmd_stage2", "tools.cmd_reproduce",
                   "tools.cmd_bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iccl",
        description="Interpolative centroid contrastive learning (ICCL) for long-tailed recognition: "
                    "convert a dataset once, train both stages, evaluate, and measure throughput.",
        epilog="Run `iccl demo` for a complete run on built-in synthetic data, "
               "`iccl COMMAND --help` for the options of a command.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 1
    set_quiet(args.quiet)
    try:
        return int(args.handler(args) or 0)
    except DataError as e:
        print(f"iccl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"iccl {args.command}: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
    finally:
        set_quiet(False)  # `main` may be called again in the same process (tests, notebooks)


if __name__ == "__main__":
    sys.exit(main())
