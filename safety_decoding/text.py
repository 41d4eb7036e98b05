"""Incremental detokenization and stop strings (TGI's prefix/read offsets; LitGPT's hold-back)."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character.

    The tokenizer decodes a short window ``ids[prefix:]`` and the delta is what the window
    adds beyond ``ids[prefix:read]``; a delta ending in U+FFFD (an incomplete byte sequence)
    is held until the next token completes it (as TGI's ``decode_token``).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the new complete text (possibly "")."""
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=self.skip)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=self.skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


class StopStringBuffer:
    """Holds back text that could be the start of a stop string.

    ``push`` returns ``(released_text, matched)``; once ``matched`` is True the text before the
    stop string has been released and nothing after it ever will be. ``flush`` releases what
    is held when generation ends without a match.
    """

    def __init__(self, stop: tuple[str, ...]):
        self.stop = stop
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        self.held += text
        if not self.stop:
            out, self.held = self.held, ""
            return out, False
        hits = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.held = self.held[:min(hits)], ""
            return out, True
        keep = max((k for s in self.stop for k in range(1, len(s))
                    if self.held.endswith(s[:k])), default=0)
        cut = len(self.held) - keep
        out, self.held = self.held[:cut], self.held[cut:]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def refusal_separator(before: str, mid_response: bool) -> str:
    """What goes between the text before an inserted refusal prefix and the prefix.

    Mid-response (the client already has response text) the refusal starts a new paragraph, so
    it reads as one ("The recipe is\\n\\nSorry, I cannot ..." rather than "The Sorry, I cannot
    ..."); at the response start only a space after a word (a prefill). Our choice; the recipe
    trains mid-response refusals with the same separator (`safety_training.data`).
    """
    if mid_response:
        return "" if before.endswith("\n\n") else "\n" if before.endswith("\n") else "\n\n"
    return " " if before and not before[-1].isspace() else ""

