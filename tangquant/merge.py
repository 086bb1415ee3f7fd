"""Placeholder: this stage is being written."""

HELP = "(not yet available)"


def add_arguments(parser):
    pass


def run(args):
    from tangquant.errors import TangquantError

    raise TangquantError("this command is not implemented yet")
