"""The one-line message of a pydantic `ValidationError`, the same in every package."""

from __future__ import annotations

from pydantic import ValidationError

MAX_ERRORS = 5  # the message stays one readable line however malformed the input
MAX_INPUT_CHARS = 80  # of an echoed value


def describe_validation_error(exc: ValidationError, *, show_input: bool = False) -> str:
    """`field: reason; ...` naming each bad field; `field=value: reason` with `show_input`.

    Values are echoed only when asked: a configuration's bad value is what its author needs to
    see, while a message read from Redis may be huge or carry secrets.
    """
    errors = exc.errors(include_url=False, include_input=show_input)
    parts = []
    for err in errors[:MAX_ERRORS]:
        field = ".".join(str(p) for p in err["loc"])
        reason = err["msg"].removeprefix("Value error, ")
        if not field:  # a rule over the whole model (e.g. unique stream ids): the reason names it
            parts.append(reason)
        elif "input" in err:
            value = repr(err["input"])
            if len(value) > MAX_INPUT_CHARS:
                value = value[: MAX_INPUT_CHARS - 3] + "..."
            parts.append(f"{field}={value}: {reason}")
        else:
            parts.append(f"{field}: {reason}")
    if len(errors) > MAX_ERRORS:
        parts.append(f"and {len(errors) - MAX_ERRORS} more")
    return "; ".join(parts)
