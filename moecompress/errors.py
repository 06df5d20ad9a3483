"""User-facing errors: the CLI turns these into one line on stderr and exit code 2."""


class UserError(Exception):
    """A mistake in the user's input (paths, flags, data, checkpoints). Never a bug of ours."""
