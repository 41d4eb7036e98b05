"""Request formats: how a training example reaches the model, one shape per way the server
accepts a prompt, built with the server's own prompt builders.

The shipped head only ever saw single-turn chat prompts. The server also takes raw completion
text (``/v1/completions``, TGI ``raw: true``) and whole conversations (docs/method.md,
"Decision 6: the query span is all client text"), so a head trained on chat alone is judged on
shapes it never saw. `example_prompt` is the one place that turns an `Example` into a `Prompt`;
the recipe (`recipe.encode_example`) and the guard baseline call it, and it calls
`safety_decoding.prompt.build_chat_prompt` / `build_raw_prompt` exactly as the routes do, so the
query span (what ``[CLS]`` reads) is the server's.

Formats (`Format`):

- ``chat``: the query as one user turn (the shipped run; the default);
- ``raw``: the query as plain text, no template (what ``/v1/completions`` and ``raw: true``
  send): all of it is query, template markers inside it are parsed as the server parses them;
- ``qa``: the query inside a plain completion frame (`QA_FRAMES`, e.g. ``"Q: ...\\nA:"``), sent raw;
- ``multi_turn``: a chat of several turns (`Turns`): a benign exchange before the request, the
  request split across two user turns, or the request, a client-written compliance turn and a
  "continue" turn.

The filler text (frames, earlier exchanges, acknowledgements, compliance openers) is the same
for both labels, so a format never predicts the label; the example keeps its label. Which frame
or shape an example gets is a stable hash of its query (`_draw`), so encoding is reproducible.
Our wording throughout.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace
from enum import Enum

from safety_decoding.prompt import Prompt, build_chat_prompt, build_raw_prompt


class Format(str, Enum):
    """How an example's query is sent (`example_prompt`)."""

    CHAT = "chat"
    RAW = "raw"
    QA = "qa"
    MULTI_TURN = "multi_turn"


class Turns(str, Enum):
    """The conversation shapes of `Format.MULTI_TURN`."""

    EXCHANGE_FIRST = "exchange_first"
    """A benign user turn and its answer, then the request."""
    SPLIT = "split"
    """The request cut in two user turns (an acknowledgement between them, or none)."""
    CONTINUE = "continue"
    """The request, a client-written assistant turn that starts to comply, then "continue"."""


QA_FRAMES = ["Q: {q}\nA:", "Question: {q}\nAnswer:", "User: {q}\nAssistant:",
             "### Instruction:\n{q}\n\n### Response:\n"]
"""Plain completion frames for `Format.QA` (no chat template)."""

EXCHANGES = [
    ("Hi! How are you today?", "I'm doing well, thank you. How can I help you?"),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Can you recommend a good book?", "Sure. 'The Hobbit' by J.R.R. Tolkien is a classic adventure."),
    ("What's 12 times 7?", "12 times 7 is 84."),
    ("Translate 'thank you' into Spanish.", "'Thank you' in Spanish is 'gracias'."),
    ("Give me a synonym for 'happy'.", "A synonym for 'happy' is 'joyful'."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("Tell me a fun fact about octopuses.", "Octopuses have three hearts and blue blood."),
    ("What time zone is Tokyo in?", "Tokyo is in Japan Standard Time, UTC+9."),
    ("I need help with something.", "Of course. What do you need help with?"),
    ("Can you answer a question for me?", "Yes, go ahead and ask."),
    ("Write one sentence about the sea.", "The sea stretched silver and quiet under the morning sky."),
]
"""Benign first exchanges for `Turns.EXCHANGE_FIRST`."""

ACKNOWLEDGEMENTS = ["Go on.", "I'm listening.", "Sure, what else?", "OK, please continue."]
"""Assistant turns between the two halves of a `Turns.SPLIT` request (or none)."""

COMPLIANCE = ["Sure, here is", "Sure, here's what you asked for:", "Of course! Here it is.\n\n1.",
              "Absolutely. Step 1:", "Certainly. First,"]
"""Client-written assistant turns of `Turns.CONTINUE`."""

CONTINUE = ["continue", "Continue.", "go on", "keep going", "Please continue where you left off."]
"""The user turn after the compliance turn of `Turns.CONTINUE`."""


def _draw(key: str, n: int) -> int:
    """A stable choice in ``range(n)`` from ``key`` (sha256; the same in every run)."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % n


def split_request(query: str) -> tuple[str, str] | None:
    """The query cut at the space nearest its middle word: ``(head, tail)``; None under four
    words (too short to hide half of it)."""
    words = query.split(" ")
    if sum(1 for w in words if w.strip()) < 4:
        return None
    k = len(words) // 2
    return " ".join(words[:k]), " ".join(words[k:])


def turns_shape(query: str) -> Turns:
    """The `Turns` shape of a query (stable hash; `Turns.SPLIT` only when `split_request` can)."""
    shapes = list(Turns) if split_request(query) else [Turns.EXCHANGE_FIRST, Turns.CONTINUE]
    return shapes[_draw("shape:" + query, len(shapes))]


def conversation(query: str) -> list[dict]:
    """The `Format.MULTI_TURN` messages of ``query`` (every content is client text, so query).

    The request stays whole in one user turn except for `Turns.SPLIT`, where its two halves are
    user turns.
    """
    shape = turns_shape(query)
    if shape is Turns.EXCHANGE_FIRST:
        q, a = EXCHANGES[_draw("exchange:" + query, len(EXCHANGES))]
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a},
                {"role": "user", "content": query}]
    if shape is Turns.SPLIT:
        head, tail = split_request(query)
        k = _draw("ack:" + query, len(ACKNOWLEDGEMENTS) + 1)
        middle = [{"role": "assistant", "content": ACKNOWLEDGEMENTS[k]}] if k < len(ACKNOWLEDGEMENTS) else []
        return [{"role": "user", "content": head}, *middle, {"role": "user", "content": tail}]
    return [{"role": "user", "content": query},
            {"role": "assistant", "content": COMPLIANCE[_draw("comply:" + query, len(COMPLIANCE))]},
            {"role": "user", "content": CONTINUE[_draw("continue:" + query, len(CONTINUE))]}]


def raw_text(query: str, fmt: Format) -> str:
    """The completion text of a raw-sent format: the query itself, or the query in a `QA_FRAMES`
    frame."""
    if fmt is Format.RAW:
        return query
    if fmt is Format.QA:
        return QA_FRAMES[_draw("qa:" + query, len(QA_FRAMES))].format(q=query)
    raise ValueError(f"{fmt.value} is not sent raw")


def _with_response_prefix(tokenizer, prompt: Prompt, prefix: str) -> Prompt:
    """A raw prompt followed by ``prefix`` as response text, tokenized as the decoder tokenizes
    an inserted refusal (plain text after the prompt; a raw request has no prefill field)."""
    if not prefix:
        return prompt
    toks = tokenizer(prefix, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return Prompt(prompt.ids + tuple(toks), prompt.query_mask + (False,) * len(toks),
                  prompt.response_start)


def example_prompt(tokenizer, ex) -> Prompt:
    """The `Prompt` of an example (``ex.query``, ``ex.format``, ``ex.response_prefix``), built as
    the server builds that request.

    ``chat`` gives exactly ``build_chat_prompt(tok, [{"role": "user", "content": query}],
    response_prefix)``, the shipped run's prompt. ``raw`` and ``qa`` use `build_raw_prompt` (text
    without markers is all query; markers in it are parsed); ``response_prefix`` then follows as
    response text. ``multi_turn`` uses `build_chat_prompt` on `conversation`.

    Raises:
        PromptError: as the builders (an empty raw prompt, a template that does not copy text).
    """
    fmt = Format(ex.format)
    if fmt is Format.CHAT:
        return build_chat_prompt(tokenizer, [{"role": "user", "content": ex.query}], ex.response_prefix)
    if fmt is Format.MULTI_TURN:
        return build_chat_prompt(tokenizer, conversation(ex.query), ex.response_prefix)
    return _with_response_prefix(tokenizer, build_raw_prompt(tokenizer, raw_text(ex.query, fmt)),
                                 ex.response_prefix)


def parse_formats(names) -> tuple[Format, ...]:
    """The config's ``formats`` list as `Format` values (a name may repeat, to weight it).

    Raises:
        ValueError: an empty list or an unknown name (the message names ``formats``).
    """
    if not names:
        raise ValueError("formats: at least one format is needed")
    try:
        return tuple(Format(n) for n in names)
    except ValueError:
        raise ValueError(f"formats: unknown format in {list(names)}; "
                         f"known: {[f.value for f in Format]}") from None


def assign_formats(examples: list, formats, seed: int) -> list:
    """Each example with a format from ``formats``, so that every source gets each format's
    share: within a source (in list order, shuffled by a ``seed``-and-source seeded RNG) the
    formats are dealt round robin. A name listed twice gets twice the share.

    Our choice over an independent draw per example: shares are exact for small sources too, and
    the rule consumes no randomness of the data builder. ``["chat"]`` returns the list unchanged.
    """
    formats = parse_formats(formats)
    if set(formats) == {Format.CHAT}:
        return list(examples)
    by_source: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        by_source.setdefault(e.source, []).append(i)
    out = list(examples)
    for source, idx in by_source.items():
        random.Random(f"{seed}:{source}").shuffle(idx)
        for rank, i in enumerate(idx):
            out[i] = replace(examples[i], format=formats[rank % len(formats)])
    return out
