"""Reading options out of a command line that argparse does not own: `submit` passes the
command's arguments on unparsed, and reads its own options and the command's path options out
of them. One reader for `--name VALUE` and `--name=VALUE`, used by `cli.split_args` and `job`."""

from __future__ import annotations


def option_value(tokens: list[str], i: int, name: str) -> tuple[str | None, int]:
    """(value, index of the token holding it) when tokens[i] is `name VALUE` or `name=VALUE`;
    (None, -1) when tokens[i] is not that option or `name` is the last token (no value)."""
    tok = tokens[i]
    if tok == name and i + 1 < len(tokens):
        return tokens[i + 1], i + 1
    if tok.startswith(name + "="):
        return tok[len(name) + 1 :], i
    return None, -1


__all__ = ["option_value"]
