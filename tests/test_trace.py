"""`ess trace`: every verdict recorded, printed and plotted."""

from safety_decoding.decode import Decoder
from safety_decoding.policy import SafetyParams
from safety_decoding.sampling import SamplingParams
from safety_decoding.trace import format_trace, plot_trace, run_trace


def test_trace_records_every_check_and_plots(tiny_model, tokenizer, tmp_path):
    trace = run_trace(Decoder(tiny_model, tokenizer), "What is 2 + 2?",
                      sampling=SamplingParams(max_new_tokens=8, ignore_eos=True),
                      safety=SafetyParams(action="monitor"))
    points = trace.safety["trace"]
    assert points[0]["tokens"] == 0  # the query verdict
    assert [p["tokens"] for p in points[1:]] == list(range(1, len(points)))
    assert len(points) - 1 == trace.safety["checks"]
    assert "query verdict" in format_trace(trace)
    out = tmp_path / "trace.png"
    plot_trace(trace, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
