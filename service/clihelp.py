"""Help text shared by every ``hashaudit`` parser: each option's help ends with its default."""

from __future__ import annotations

import argparse
from typing import Any


def _show(value: Any) -> str:
    if isinstance(value, list | tuple):
        return " ".join(_show(v) for v in value) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class HelpFormatter(argparse.HelpFormatter):
    """An option's help gets ``(default: X)`` or ``(required)``.

    Flags (``store_true``) and options whose default is ``None`` are left as they are: their
    help says what happens without them (the test suite checks that it does)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.help == argparse.SUPPRESS:
            return text
        if action.required:
            return text if "required" in text else f"{text} (required)".strip()
        if (action.default is None or action.default is False or action.nargs == 0
                or action.default == argparse.SUPPRESS or "default" in text.lower()):
            return text
        shown = _show(action.default).replace("%", "%%")
        return f"{text} (default: {shown})".strip()


def parser(prog: str, description: str | None = None, **kwargs: Any) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the shared formatter."""
    return argparse.ArgumentParser(prog=prog, description=description,
                                   formatter_class=HelpFormatter, **kwargs)
