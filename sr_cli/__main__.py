"""``python -m sr_cli`` and the ``sr`` script (``sr_cli.__main__:run``).

Ctrl-C while the command modules are still being imported (the first tens of
milliseconds) is a ``KeyboardInterrupt`` raised inside the import machinery: caught
here, it is one line and exit 130 like an interruption at any later moment."""

import sys


def run() -> int:
    try:
        from sr_cli.main import main
    except KeyboardInterrupt:
        print("sr: interrupted", file=sys.stderr)
        return 130  # sr_core.errors.EXIT_INTERRUPTED, not imported: the import was interrupted
    return main()


if __name__ == "__main__":
    sys.exit(run())
