"""benchmarks/step_profile.py: how operations are sorted into kinds, and a run on the tiny model."""

import json
from types import SimpleNamespace

from safety_decoding.decode import Decoder

from benchmarks.step_profile import main, split


def test_operations_are_sorted_into_products_attention_and_the_rest():
    events = [SimpleNamespace(key="mkldnn::_linear_pointwise", self_cpu_time_total=60_000),
              SimpleNamespace(key="aten::_scaled_dot_product_flash_attention_for_cpu", self_cpu_time_total=20_000),
              SimpleNamespace(key="aten::mul", self_cpu_time_total=10_000)]
    assert split(events, steps=2, step_ms=50.0) == {"products": 30.0, "attention": 10.0, "other_ops": 5.0,
                                                    "python_and_rest": 5.0}
    assert split(events, steps=2, step_ms=40.0)["python_and_rest"] == 0.0  # profiler cost exceeds the step


def test_every_batch_and_safety_setting_is_profiled_and_the_split_adds_up(tmp_path, tiny_model, tokenizer,
                                                                          monkeypatch, capsys):
    monkeypatch.setattr("benchmarks.step_profile.load", lambda dtype, quantization: (Decoder(tiny_model, tokenizer), tokenizer))
    out = tmp_path / "profile.json"
    main(["--batch", "1", "2", "--prompt-tokens", "40", "--steps", "2", "--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [(r["batch"], r["safety"]) for r in rows] == [(1, "each"), (1, "off"), (2, "each"), (2, "off")]
    assert all(r["step_ms"] > 0 and r["products"] > 0 and r["attention"] > 0 for r in rows)
    assert "| 2 | each |" in capsys.readouterr().out
