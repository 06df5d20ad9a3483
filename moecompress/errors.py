"""User-facing errors: the CLI turns these into one line on stderr and exit code 2."""


class UserError(Exception):
    """A mistake in the user's input (paths, flags, data, checkpoints). Never a bug of ours."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (its lines joined, whitespace collapsed, cut at ``limit``)."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
