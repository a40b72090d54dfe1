"""Incremental detokenization with stop strings.

Each step a request gains one (or a few) token ids; the detokenizer turns them into new text
without re-decoding the whole output, never splits a multi-byte UTF-8 character (a token that
ends inside one decodes to U+FFFD, and we wait for the next token), and finds stop strings even
when they straddle token boundaries.

The window trick: keep two offsets into the output ids. ``decode(ids[prefix:read])`` is text that
was already emitted; ``decode(ids[prefix:])`` is the same plus the new tokens. Their difference is
the new text. Decoding a short window (instead of all ids) keeps a step O(new tokens) while the
few tokens of left context keep tokenizers whose output depends on neighbours (leading-space
rules, byte fallback) consistent with one ``decode`` of the full output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["IncrementalDetokenizer", "DetokenizerUpdate"]

_REPLACEMENT = "\ufffd"


@dataclass
class DetokenizerUpdate:
    """What one :meth:`IncrementalDetokenizer.add_tokens` call produced.

    Attributes:
        new_text: text that may be streamed now (stop strings and text that might still become
            one are held back).
        stop_string: the stop string that matched, or ``None``.
    """

    new_text: str
    stop_string: str | None = None


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text, incrementally.

    Args:
        tokenizer: a transformers tokenizer (anything with ``decode(ids, skip_special_tokens=...,
            spaces_between_special_tokens=...)``).
        stop: stop strings; generation stops at the first one found in the output text.
        include_stop_str_in_output: keep the matched stop string at the end of the text.
        skip_special_tokens, spaces_between_special_tokens: passed to ``decode``.

    ``text`` is the output text so far (trimmed at a stop string), ``output_token_ids`` the ids.
    The concatenation of all ``new_text`` pieces plus :meth:`flush` equals ``text``.
    """

    def __init__(
        self,
        tokenizer,
        *,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self._decode_kwargs = {"skip_special_tokens": skip_special_tokens}
        if not spaces_between_special_tokens:
            self._decode_kwargs["spaces_between_special_tokens"] = False
        self.output_token_ids: list[int] = []
        self.text = ""
        self.stop_string: str | None = None
        self._prefix_offset = 0
        self._read_offset = 0
        self._emitted = 0  # characters of ``text`` already handed out as new_text
        self._holdback = max((len(s) for s in self.stop), default=1) - 1
        self.stop_enabled = True  # False while the request is under min_tokens: stop strings do not count yet

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), **self._decode_kwargs)

    def add_tokens(self, token_ids: Sequence[int]) -> DetokenizerUpdate:
        """Append ``token_ids`` and return the text that became final.

        After a stop string matched, further calls are errors.
        """
        if self.stop_string is not None:
            raise ValueError("add_tokens after a stop string finished the output")
        self.output_token_ids.extend(token_ids)
        ids = self.output_token_ids
        before = self._decode(ids[self._prefix_offset : self._read_offset])
        after = self._decode(ids[self._prefix_offset :])
        if len(after) > len(before) and not after.endswith(_REPLACEMENT):
            grown = after[len(before) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(ids)
            self.text += grown
            if self.stop and self.stop_enabled:
                self._check_stop(len(grown))
        return DetokenizerUpdate(self._take(final=self.stop_string is not None), self.stop_string)

    def _check_stop(self, grown: int) -> None:
        # A match can only involve the new characters plus (longest stop - 1) before them.
        start = max(0, len(self.text) - grown - self._holdback)
        best = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            i, s = best
            self.stop_string = s
            self.text = self.text[: i + len(s)] if self.include_stop_str_in_output else self.text[:i]

    def _take(self, *, final: bool) -> str:
        end = len(self.text) if final or not self.stop else len(self.text) - self._holdback
        if end <= self._emitted:
            return ""
        piece = self.text[self._emitted : end]
        self._emitted = end
        return piece

    def flush(self) -> str:
        """Finish the output: return the remaining held-back text.

        A trailing partial character (ids that end inside a UTF-8 sequence) is decoded the way
        ``tokenizer.decode`` would decode it, so ``text`` equals ``decode(output_token_ids)``
        (when no stop string trimmed it).
        """
        if self.stop_string is None:
            tail = self._decode(self.output_token_ids[self._prefix_offset :])
            before = self._decode(self.output_token_ids[self._prefix_offset : self._read_offset])
            if len(tail) > len(before):
                self.text += tail[len(before) :]
                self._prefix_offset = self._read_offset = len(self.output_token_ids)
        return self._take(final=True)
