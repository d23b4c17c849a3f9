"""The `latentdiff` command line: `latentdiff generate | make-dataset | bench`."""

from __future__ import annotations

import argparse
import sys

from latentdiff import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentdiff", description=__doc__)
    parser.add_argument("--version", action="version", version=f"latentdiff {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
