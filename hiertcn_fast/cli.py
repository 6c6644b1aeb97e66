"""Command line: ``python -m hiertcn_fast <command>`` (also the ``hiertcn-fast`` console script)."""

import argparse
import sys


def _info(args) -> int:
    from .backends import describe

    print(describe())
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hiertcn-fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="which backends are usable here, and how to fix the others").set_defaults(
        run=_info)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
