"""`sr upscale` (placeholder until the Upscaler lands)."""


def add_upscale_parser(sub) -> None:
    pass
