"""Conversations as calibration or evaluation text: a dataset column of chat turns, rendered to documents.

Instruct models are best calibrated on text laid out as they are served: the conversation rendered with the
model's own chat template (llm-compressor's and GPTQModel's examples do this by hand with
``apply_chat_template`` before calibrating). A dataset without a ``text`` column whose ``messages``,
``conversations`` or ``conversation`` column is a list of turns -- ``{"role", "content"}`` (OpenAI / HF chat
format, e.g. UltraChat) or ``{"from", "value"}`` (ShareGPT: ``human``/``gpt``/``system``) -- becomes one
document per conversation: ``tokenizer.apply_chat_template(turns, tokenize=False)``. Without a template (base
models' tokenizers) each turn is a ``role: content`` line, and the log says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..errors import UserError, one_line

log = logging.getLogger("moecompress")

CHAT_COLUMNS = ("messages", "conversations", "conversation")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                   "function_call": "assistant", "system": "system", "tool": "tool", "function": "tool",
                   "observation": "tool"}

Renderer = Callable[[list[dict]], str]


def plain(turns: list[dict]) -> str:
    """A conversation as ``role: content`` lines (when the tokenizer has no chat template)."""
    return "\n".join(f"{t['role']}: {t['content']}" for t in turns)


def chat_renderer(tokenizer) -> Renderer | None:
    """The model's chat template as a function of one conversation; None when its tokenizer has none."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None

    def render(turns: list[dict]) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False)

    return render


def _is_turn(x) -> bool:
    return isinstance(x, dict) and ("role" in x and "content" in x or "from" in x and "value" in x)


def chat_column(ds, names: tuple[str, ...] = CHAT_COLUMNS) -> str | None:
    """The column among ``names`` of dataset ``ds`` that holds conversations (lists of turn records), if any.

    The column's type says so when every turn has the same keys (``List({role, content})``); with turns of
    different keys (``tool_calls``, ``reasoning_content``...) datasets types it ``List(Json)``, or older
    versions a plain list, so the first 16 non-empty rows decide. A conversation column that holds something else is an
    error, never a reason to calibrate on another column."""
    for name in names:
        if name not in ds.features:
            continue
        inner = getattr(ds.features[name], "feature", None)
        if isinstance(inner, dict) and ({"role", "content"} <= inner.keys() or {"from", "value"} <= inner.keys()):
            return name
        if getattr(ds.features[name], "dtype", None) in ("string", "large_string"):
            continue  # a text column that happens to be called so: the caller's column rules apply
        rows = _first_nonempty(ds, name, 16)
        if rows and all(isinstance(r, list) for r in rows) and any(_is_turn(t) for r in rows for t in r):
            return name  # (each row's turns are checked as it is rendered, with its row number)
        raise UserError(f"column '{name}' holds neither text nor conversations (lists of {{role, content}} or "
                        f"{{from, value}} turns); its type is {ds.features[name]}")
    return None


def _first_nonempty(ds, name: str, n: int) -> list:
    """The first ``n`` non-empty values of column ``name`` (a dataset may open with empty conversations)."""
    rows: list = []
    for batch in ds.select_columns([name]).iter(batch_size=256):
        rows += [r for r in batch[name] if r][: n - len(rows)]
        if len(rows) == n:
            break
    return rows


def _content(value, where: str) -> str:
    """A turn's text: a string, None (an assistant turn that only calls tools), or a list of parts (the text
    ones joined; images and audio have no text)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(p if isinstance(p, str) else p.get("text") or "" for p in value
                       if isinstance(p, str) or isinstance(p, dict))
    raise UserError(f"{where}: a turn's content is {type(value).__name__}, not text")


def turns_of(record: list | None, where: str) -> list[dict]:
    """One row's turns as ``{"role", "content", ...}`` (ShareGPT's ``from``/``value`` mapped; other keys such as
    ``tool_calls`` kept for the template, unset ones dropped); [] for an empty row."""
    turns = []
    for turn in record or []:
        if not isinstance(turn, dict):
            raise UserError(f"{where}: a turn is not a record ({type(turn).__name__})")
        if turn.get("role") is not None:
            role, content = turn.get("role"), turn.get("content")
        else:
            role, content = _SHAREGPT_ROLES.get(turn.get("from")), turn.get("value")
            if role is None and turn.get("from") is not None:
                raise UserError(f"{where}: ShareGPT turn from {turn.get('from')!r} is not a role this knows "
                                f"({', '.join(sorted(_SHAREGPT_ROLES))}); name the roles 'role'/'content' instead")
        if not isinstance(role, str):
            raise UserError(f"{where}: every turn needs a role (got {role!r})")
        extra = {k: v for k, v in turn.items() if k not in ("role", "content", "from", "value") and v is not None}
        turns.append({**extra, "role": role, "content": _content(content, where)})
    return turns


def render_column(ds, column: str, origin: str, render: Renderer | None) -> list[str]:
    """Every non-empty conversation of ``ds[column]`` as one document (``render`` None: :func:`plain`, logged)."""
    if render is None:
        log.info("%s: the tokenizer has no chat template; conversations are rendered as 'role: content' lines",
                 origin)
        render = plain
    docs = []
    i = 0
    for batch in ds.select_columns([column]).iter(batch_size=1024):
        for record in batch[column]:
            turns = turns_of(record, f"{origin} row {i}")
            if any(t["content"].strip() for t in turns):
                try:
                    docs.append(render(turns))
                except Exception as e:  # noqa: BLE001 - templates raise many types (e.g. "roles must alternate")
                    raise UserError(f"{origin} row {i}: the chat template refused the conversation: "
                                    f"{one_line(e)}") from None
            i += 1
    if render is not plain:
        log.info("%s: %d conversations rendered with the model's chat template", origin, len(docs))
    return docs
