"""The ``gistress`` command: one subcommand per module in ``suite.cli.commands``.

Every user-facing error is a GistressError printed as one line with a non-zero exit; a
traceback appears only with ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import suite  # noqa: F401  (offline defaults first)
from suite.execution.lifecycle import EXIT_INTERRUPTED, EXIT_USAGE, install_sigterm

COMMANDS = ("doctor", "variants", "attack", "study", "audit", "ui")
COMPUTES = ("attack", "study", "audit")  # the subcommands that run attacks in this process


class _Parser(argparse.ArgumentParser):
    """argparse with the suite's error format: one ``error: ...`` line (exit 2), no usage block."""

    def error(self, message: str):
        """Print the problem and where the valid flags are listed, then exit 2."""
        text = " ".join(f"{message} (fix: see `{self.prog} --help`)".split())
        self.exit(2, f"error: {text}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand."""
    parser = _Parser(prog="gistress", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"gistress {suite.__version__}")
    parser.add_argument("--threads", default=None,
                        help="intra-op CPU threads for attacks: auto (1 on up to 4 CPUs, else half) or N "
                             "(default: $GISTRESS_THREADS or auto; see docs/benchmarks.md)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"suite.cli.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"suite.cli.commands.{name}":
                continue
            raise
        p = module.add_parser(sub)
        # --debug is accepted before or after the subcommand
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        p.set_defaults(_run=module.run, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    from suite.errors import GistressError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand's parser, with the nearest flag it knows
        from suite.errors import close_matches

        target = getattr(args, "_parser", parser)
        flags = [o for action in target._actions for o in action.option_strings]
        word = next((e for e in extra if e.startswith("-")), extra[0]).split("=")[0]
        near = close_matches(word, flags, n=1)
        target.error(f"unrecognized arguments: {' '.join(extra)}" + (f" (did you mean {near}?)" if near else ""))
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    restore = lambda: None  # noqa: E731
    try:
        from suite.execution.threads import ENV, resolve_threads

        threads = resolve_threads(args.threads)  # a bad value fails before any work
        if args.command in COMPUTES:
            import os

            from suite.execution.threads import apply_threads

            restore = install_sigterm()  # SIGTERM ends runs KILLED, exactly like Ctrl-C
            os.environ.setdefault(ENV, str(threads))  # worker processes follow the same choice
            apply_threads(threads)
        return int(args._run(args) or 0)
    except GistressError as exc:
        if args.debug:
            raise
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        restore()


if __name__ == "__main__":
    sys.exit(main())
