"""Text for people: file names that are not valid UTF-8 made visible instead of silently lost."""

from __future__ import annotations


def readable(text: str) -> str:
    r"""The text with every undecodable byte of a file name written as \xNN.

    On Linux a file name is bytes; Python keeps bytes that are not UTF-8 as lone surrogates (PEP 383), which a
    UTF-8 stream cannot write and Qt drops without a word, so 'caf\xe9.png' would be shown as 'caf.png', the
    name of another file or of none.
    """
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that no file name produced: show it as \udXXX
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")
