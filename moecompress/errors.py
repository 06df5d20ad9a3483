"""User-facing errors: the CLI turns these into one line on stderr and exit code 2."""


class UserError(Exception):
    """A mistake in the user's input (paths, flags, data, checkpoints). Never a bug of ours."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (its lines joined, whitespace collapsed, cut at ``limit``)."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def settings_error(e, fields, recipe_label: str, cli_flags: dict[str, str] | None = None) -> UserError:
    """One line from a pydantic ``ValidationError`` of a settings model with ``fields``: in its recipe keys
    (``recipe_label`` 'KEY': ...), or, with ``cli_flags`` (the flags that are not ``--`` + the key with dashes),
    in the command-line options the user typed: keys with an underscore in the text become their flags (one-word
    keys read as plain words)."""
    import re

    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
    if cli_flags is None:
        return UserError(f"{recipe_label} '{loc}': {msg}" if loc else f"{recipe_label}s: {msg}")

    def flag(key: str) -> str:
        return cli_flags.get(key, "--" + key.replace("_", "-"))

    keys = [k for k in fields if "_" in k]
    if keys:
        msg = re.sub(r"\b(" + "|".join(map(re.escape, keys)) + r")\b", lambda m: flag(m.group(1)), msg)
    return UserError(f"invalid option {flag(str(err['loc'][0]))}: {msg}" if loc else f"invalid options: {msg}")


def set_apart_from(model, keys: tuple[str, ...], applies_to: str) -> str | None:
    """The validation message for settings ``keys`` of pydantic ``model`` given values (away from their defaults)
    that only matter with ``applies_to``, naming just those set; None when none is."""
    fields = type(model).model_fields
    given = [k for k in keys if getattr(model, k) != fields[k].default]
    if not given:
        return None
    return f"{' and '.join(given)} {'applies' if len(given) == 1 else 'apply'} to {applies_to}"
