"""jobs' subcommands (prepare, train)."""


def register(sub) -> None:
    pass
