"""Safety trace: every verdict of one generation, as a table and as a plot (matplotlib)."""

from __future__ import annotations

from dataclasses import dataclass

from .decode import Decoder, GenerationRequest
from .policy import SafetyParams
from .prompt import build_chat_prompt
from .sampling import SamplingParams


@dataclass
class Trace:
    prompt: str
    response_prefix: str
    text: str
    """The response the caller received (after any truncation and refusal)."""
    tokens: list[str]
    """Text of each released token, in order."""
    safety: dict
    """The final `SafetyState.summary`, with ``trace``: ``[{"tokens", "score"}]``."""


def run_trace(decoder: Decoder, prompt: str, response_prefix: str = "",
              sampling: SamplingParams | None = None,
              safety: SafetyParams | None = None) -> Trace:
    """Generate once with every verdict recorded (``safety`` None: the checkpoint's policy,
    `SafetyParams.from_config`)."""
    req = GenerationRequest(build_chat_prompt(decoder.tok, [{"role": "user", "content": prompt}],
                                              response_prefix),
                            sampling or SamplingParams(max_new_tokens=64),
                            safety or SafetyParams.from_config(decoder.model.config), trace=True)
    events = [e for step in decoder.generate([req]) for e in step]
    tokens = [t.text for e in events for t in e.tokens]
    return Trace(prompt, response_prefix, "".join(tokens), tokens, events[-1].safety)


def plot_trace(trace: Trace, path: str) -> None:
    """Generated tokens along x, p_malicious along y, the threshold, and the trip if any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = trace.safety
    pts = s["trace"]
    fig, ax = plt.subplots(figsize=(9, 4))
    xs, ys = [p["tokens"] for p in pts], [p["score"] for p in pts]
    ax.plot(xs, ys, marker="o", ms=3, label="p_malicious ([CLS] head)")
    hot = [(x, y) for x, y in zip(xs, ys) if y > s["threshold"]]
    if hot:
        ax.scatter(*zip(*hot), color="red", s=18, zorder=3, label="malicious verdict")
    ax.axhline(s["threshold"], color="grey", ls="--", label=f"threshold {s['threshold']}")
    if s["intervened"]:
        ax.axvline(s["trip_token"], color="red", ls=":",
                   label=f"trip: {s['stage']} at token {s['trip_token']} ({s['action']})")
    if s["would_trip"]:
        ax.plot([], [], " ", label=f"monitor: would trip {len(s['would_trip'])}x "
                                   f"(first at the {s['would_trip'][0]} verdict)")
    ax.set_xlim(-0.5, max(xs + [len(trace.tokens), 1]) + 0.5)
    ax.set_xlabel("generated tokens (0 = query verdict at prefill)")
    ax.set_ylabel("p_malicious")
    ax.set_ylim(-0.02, 1.02)
    title = trace.prompt if len(trace.prompt) < 70 else trace.prompt[:67] + "..."
    if trace.response_prefix:
        title += f"\nprefill: {trace.response_prefix[:60]!r}"
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower left", fontsize=8, framealpha=0.9)
    fig.text(0.01, 0.01, "response: " + repr(trace.text[:110]), fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_trace(trace: Trace) -> str:
    """A plain-text table: each verdict with the text it covered up to."""
    s = trace.safety
    lines = [f"query verdict p={s['query_score']}  threshold={s['threshold']}  "
             f"schedule={s['schedule']}  action={s['action']}"]
    trip_at = s["trip_token"] if s["intervened"] else None
    for p in s["trace"][1:]:
        if trip_at is not None and p["tokens"] > trip_at:  # text the trip cut away
            upto = "(tokens removed by the trip)"
        else:
            upto = "..." + repr("".join(trace.tokens[:p["tokens"]])[-40:])
        flag = "MALICIOUS" if p["score"] > s["threshold"] else ""
        lines.append(f"  after {p['tokens']:4d} tokens  p={p['score']:.3f} {flag:9s} {upto}")
    if s["intervened"]:
        lines.append(f"tripped: stage={s['stage']} at token {s['trip_token']}")
    lines.append(f"response: {trace.text!r}")
    return "\n".join(lines)
