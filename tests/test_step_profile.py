"""benchmarks/step_profile.py: the split of a decode step adds up and the JSON has every row."""

import json

from safety_decoding.decode import Decoder

from benchmarks.step_profile import main


def test_every_batch_and_safety_setting_is_profiled_and_the_split_adds_up(tmp_path, tiny_model, tokenizer,
                                                                          monkeypatch, capsys):
    monkeypatch.setattr("benchmarks.step_profile.load", lambda dtype: (Decoder(tiny_model, tokenizer), tokenizer))
    out = tmp_path / "profile.json"
    main(["--batch", "1", "2", "--prompt-tokens", "40", "--steps", "2", "--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [(r["batch"], r["safety"]) for r in rows] == [(1, "each"), (1, "off"), (2, "each"), (2, "off")]
    for r in rows:
        parts = r["products"] + r["attention"] + r["other_ops"] + r["python_and_rest"]
        assert r["step_ms"] > 0 and r["products"] > 0 and parts >= r["step_ms"] - 0.2
    assert "| 2 | each |" in capsys.readouterr().out
