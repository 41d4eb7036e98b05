"""Prompt construction: chat template, user-query span, and the response prefix.

The ``[CLS]`` query span is the text of the user turns only (paper §1.3: the drivers pass
``positions = [start_idx_input, end_idx_input]``, the user instruction without template text).
We find it from character offsets of the rendered template, which works for any chat template
that copies the user content verbatim.
"""

from __future__ import annotations

from dataclasses import dataclass


class PromptError(ValueError):
    """The prompt cannot be built; ``field`` names the request field at fault."""

    def __init__(self, message: str, field: str = "inputs"):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Prompt:
    """Token ids of a prompt, without ``[CLS]`` (the decoder prepends it at slot 0)."""

    ids: tuple[int, ...]
    query_mask: tuple[bool, ...]
    """True for tokens of the user query: what ``[CLS]`` reads."""
    response_start: int
    """Index of the first response token (``response_prefix`` tokens come from here)."""

    @property
    def reads_cls_from(self) -> int:
        """First index whose row attends to ``[CLS]``: the token after the last query token.

        Our choice: the template tail ("<|im_end|>... assistant\\n") reads ``[CLS]`` as the
        response does, because its last row predicts the first response token.
        """
        last = max((i for i, q in enumerate(self.query_mask) if q), default=-1)
        return last + 1


def _char_spans_to_mask(offsets, spans) -> list[bool]:
    return [any(s < e_tok and b_tok < e for s, e in spans) and e_tok > b_tok
            for b_tok, e_tok in offsets]


def build_chat_prompt(tokenizer, messages: list[dict], response_prefix: str = "") -> Prompt:
    """Render ``messages`` with the tokenizer's chat template and mark every user turn.

    Args:
        messages: ``[{"role": ..., "content": ...}, ...]``; the last one must be a user turn.
        response_prefix: text placed after the assistant header; it is response text for the
            safety re-checks (a prefill), never part of the query.

    Raises:
        PromptError: no user turn, or a template that does not copy user content verbatim.
    """
    if not any(m["role"] == "user" for m in messages):
        raise PromptError("the conversation has no user message", "messages")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    spans, cursor = [], 0
    for m in messages:
        if m["role"] != "user" or not m["content"]:
            continue
        start = text.find(m["content"], cursor)
        if start < 0:
            raise PromptError("the chat template does not contain the user text verbatim")
        spans.append((start, start + len(m["content"])))
        cursor = start + len(m["content"])
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = _char_spans_to_mask(enc["offset_mapping"], spans)
    prefix_ids = tokenizer(response_prefix, add_special_tokens=False)["input_ids"] if response_prefix else []
    return Prompt(tuple(ids + prefix_ids), tuple(mask + [False] * len(prefix_ids)), len(ids))


def _user_turn_markers(tokenizer) -> tuple[str, str, str] | None:
    """``(user_opener, user_closer, assistant_header)`` of the tokenizer's chat template,
    found by rendering a sentinel user turn after a system turn; None without a template."""
    sentinel = "\x00ESS-SENTINEL\x00"
    system = [{"role": "system", "content": "s"}]
    convo = system + [{"role": "user", "content": sentinel}]
    try:
        base = tokenizer.apply_chat_template(system, tokenize=False)
        turn = tokenizer.apply_chat_template(convo, tokenize=False)
        prompt = tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
    except Exception:  # the tokenizer has no usable chat template
        return None
    if not turn.startswith(base) or sentinel not in turn or not prompt.startswith(turn):
        return None
    opener, closer = turn[len(base):].split(sentinel)
    header = prompt[len(turn):]
    if not (opener.strip() and closer.strip() and header.strip()):
        return None
    return opener, closer.rstrip("\n") or closer, header


def build_raw_prompt(tokenizer, text: str) -> Prompt:
    """An already-templated prompt (TGI ``raw`` mode).

    When the text holds the model's own chat-template turns, only the user turns are the
    query and any text after the last assistant header is response text (a prefill), exactly
    as for a chat request: otherwise a client could hide a request from ``[CLS]`` (it was
    trained to read user text only) by templating it itself. Text without template markers
    is all query.

    Raises:
        PromptError: the text is empty.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if not ids:
        raise PromptError("the prompt is empty")
    markers = _user_turn_markers(tokenizer)
    spans = []
    if markers:
        opener, closer, gen_header = markers
        cursor = 0
        while (start := text.find(opener, cursor)) >= 0:
            start += len(opener)
            end = text.find(closer, start)
            end = len(text) if end < 0 else end
            spans.append((start, end))
            cursor = end
    if not spans:
        return Prompt(tuple(ids), tuple([True] * len(ids)), len(ids))
    mask = _char_spans_to_mask(enc["offset_mapping"], spans)
    response_start = len(ids)
    header = text.rfind(markers[2])
    if header >= 0 and header >= spans[-1][1]:
        cut = header + len(markers[2])
        response_start = next((i for i, (b, _) in enumerate(enc["offset_mapping"]) if b >= cut), len(ids))
    return Prompt(tuple(ids), tuple(mask), response_start)
