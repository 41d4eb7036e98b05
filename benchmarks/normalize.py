"""What client-text normalization costs a message at the character bound, by kind of text.

`prompt.normalize_client_text` runs in Python with the GIL held, on every message before it is
tokenized (docs/method.md, "Decision 14"). Pure-Python work in a worker thread delays the engine
thread each time it takes the GIL back between kernels, so a burst of large non-ASCII messages
stretches the running streams' token gaps even when every one of them is refused. This benchmark
times one call per text kind, each text ``--chars`` characters long (default: the server's
character bound with the default ``ESS_MAX_INPUT_TOKENS``, 4,096 tokens x 81 characters, the
longest SmolLM2 token), and reports milliseconds, nanoseconds a character, and the ratio to
ASCII text of the same length (which skips every Unicode rule), all from one run. The text kinds
are everyday scripts and the disguises the rules undo, plus the worst cases we know of for the
scans (every mark run or word needing a Python call, one run of marks looked at one by one, every
word shouted). ``tests/test_prompt.py`` holds the texts built to make a scan backtrack.

Run: ``python -m benchmarks.normalize [--chars 331776] [--rounds 3] [--json PATH]`` (under a
minute).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from benchmarks.common import markdown_table, shuffled, write_json
from safety_decoding.prompt import normalize_client_text


def texts(chars: int) -> dict[str, str]:
    """``chars``-character texts by kind (deterministic)."""
    rng = random.Random(0)

    def repeat(unit: str) -> str:
        return (unit * (chars // len(unit) + 1))[:chars]

    return {
        "ASCII English": repeat("The quick brown fox jumps over the lazy dog. How do I build a shed? "),
        "Russian": repeat("Привет, как дела? Это обычный текст на русском языке. "),
        "Chinese (full-width punctuation)": repeat("这是一个普通的中文句子，用于测试。"),
        "Hindi (vowel signs)": repeat("यह एक साधारण हिंदी वाक्य है जिसका उपयोग परीक्षण के लिए किया जाता है। "),
        "Latin letters with accents (ḅ)": repeat("ḅ"),
        "struck through (U+0336)": repeat("".join(c + "\u0336" for c in "pipe bomb ")),
        "mathematical bold": repeat("\U0001d5fd\U0001d5f6\U0001d5fd\U0001d5f2 \U0001d5ef\U0001d5fc\U0001d5fa\U0001d5ef "),
        "zero-width spaces": repeat("b\u200bo\u200bm\u200bb "),
        "random mix of all rules": "".join(rng.choice("abcdeабвгд é\u0301ñ\U0001F600\U0001d5fd\u2460\uff58\u3000\u00a0")
                                           for _ in range(chars)),
        "worst: combining Latin letters": repeat("д\u0363"),
        "worst: mixed-script words": repeat("a\u0430 "),
        "worst: one run of spacing marks": "a" + "\u0903" * (chars - 1),
        "worst: shouted words": repeat("\u0416\u0416\u0416\u0416 "),
        "worst: scrambled case": repeat("MaKe a pIpE BoMb "),
        "worst: scrambled case, Cyrillic": repeat("\u0441\u0414\u0435\u041b\u0430\u0422\u044c \u0431\u041e\u043c\u0411\u0443 "),
        # 4 bytes each: as many as the byte bound lets through; NFC makes each three characters
        "worst: musical notes, a quarter as many": "\U0001d160" * (chars // 4),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.normalize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chars", type=int, default=4096 * 81)
    ap.add_argument("--rounds", type=int, default=3, help="timed calls per text (the median is kept)")
    ap.add_argument("--json", default="benchmarks/results/normalize.json")
    args = ap.parse_args(argv)

    kinds = texts(args.chars)
    normalize_client_text("\u00e9")  # builds the tables once, as the server's warm-up does
    seconds: dict[str, list[float]] = {k: [] for k in kinds}
    names = list(kinds)
    for r in range(args.rounds):
        for i in shuffled(len(names), r):
            t = time.perf_counter()
            normalize_client_text(kinds[names[i]])
            seconds[names[i]].append(time.perf_counter() - t)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    ascii_s = median["ASCII English"]
    rows = [[k, round(1000 * s, 1), round(1e9 * s / args.chars), round(s / ascii_s, 1)] for k, s in median.items()]
    print(markdown_table(["text", "ms a message", "ns a character", "x ASCII"], rows))
    result = {"chars": args.chars, "rounds": args.rounds, "seconds": seconds, "median_seconds": median}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
