"""``ess eval --quick`` end to end on tiny random models: output structure and resume."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import DATA_DIR, tiny_safety_model

pytestmark = pytest.mark.skipif(not DATA_DIR.exists(), reason="the data files are not fetched (ess data fetch)")
LIMIT = 2


class _NoGeneration:
    """A decoder stand-in that fails on use: a resumed run must not generate."""

    def __init__(self, decoder):
        self.model, self.tok, self.refusal = decoder.model, decoder.tok, decoder.refusal

    def generate(self, requests):
        raise AssertionError("a resumed run generated again")


def tiny_models(tokenizer):
    from safety_eval.harness.backends import Models
    from safety_decoding.decode import Decoder
    from safety_training.guard import Guard

    plain = Decoder(tiny_safety_model(tokenizer, seed=1), tokenizer)
    ckpt = Decoder(tiny_safety_model(tokenizer, seed=0), tokenizer)
    torch.manual_seed(0)
    guard = Guard(plain.model.decoder, torch.randn(64) * 0.3, 0.0, 0.5)
    return Models(tokenizer, plain, ckpt, guard,
                  {"plain": "tiny-plain", "checkpoint": "tiny-ckpt", "guard": "tiny-guard"})


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, tokenizer):
    import safety_eval.harness.run as run
    from ess.cli import main

    out = tmp_path_factory.mktemp("eval")
    models = tiny_models(tokenizer)
    mp = pytest.MonkeyPatch()
    mp.setattr(run, "load_models", lambda checkpoint, base_dir, dtype: models)
    # --limit keeps the test fast; everything else is the --quick plan
    argv = ["eval", "--quick", "--limit", str(LIMIT), "--output", str(out), "--data-dir", str(DATA_DIR)]
    assert main(argv) == 0
    first = json.loads((out / "results.json").read_text())
    models.plain, models.checkpoint = _NoGeneration(models.plain), _NoGeneration(models.checkpoint)
    assert main(argv) == 0
    second = json.loads((out / "results.json").read_text())
    mp.undo()
    return out, first, second


def test_results_json_has_one_row_per_system_and_set(quick_run):
    from safety_eval.harness.plan import QUICK
    from safety_eval.harness.systems import QUICK_SYSTEMS

    _, res, _ = quick_run
    rows = res["results"]
    sets = list(QUICK.attacks) + list(QUICK.benign)
    assert {(r["system"], r.get("attack") or r.get("benign_set")) for r in rows} == \
        {(s, a) for s in QUICK_SYSTEMS for a in sets}
    assert len(rows) == len(QUICK_SYSTEMS) * len(sets)
    for r in rows:
        assert {"system", "schedule", "action", "n", "judge_false_negative_rate",
                "judge_false_positive_rate", "subset"} <= r.keys()
        rate = r["attack_success_rate"] if "attack" in r else r["refusal_rate"]
        assert r["n"] > 0 and 0 <= rate <= 1
        name = "attack_success_rate" if "attack" in r else "refusal_rate"
        lo, hi = r[f"{name}_bounds"]
        assert lo <= r[f"{name}_judge_corrected"] <= hi
    direct = [r for r in rows if r.get("attack") == "direct"]
    assert all(r["n"] == LIMIT for r in direct)
    decoding = [r for r in rows if r.get("attack") == "decoding"]
    assert all(r["n"] == LIMIT for r in decoding)  # goals, not (goal, setting) pairs
    assert {r["system"]: (r["schedule"], r["action"]) for r in rows}["ess/first/refuse"] == ("first", "refuse")
    assert res["not_run"] and res["judge_validation"]["current"]["all"]["n"] == 2250 + 169


def test_benign_rows_compare_with_base_and_utility_is_relative(quick_run):
    _, res, _ = quick_run
    benign = [r for r in res["results"] if "benign_set" in r]
    assert all(r["unchanged_vs_base"] == 1.0 for r in benign if r["system"] == "base")
    util = {u["system"]: u for u in res["utility"]}
    assert util["base"]["perplexity_ratio_vs_base"] == 1.0
    assert util["guard"]["perplexity"] == util["base"]["perplexity"]
    assert util["sft_only"]["perplexity"] > 0 and util["sft_only"]["n_tokens"] > 0


def test_markdown_and_plots_are_written(quick_run):
    out, res, _ = quick_run
    md = (out / "results.md").read_text()
    assert "## Attack success rate" in md and "| ess/each/refuse |" in md and "Judge validation" in md
    assert "rows under 5 %" in md
    for name in res["plots"]:
        assert (out / name).stat().st_size > 1000
    assert (out / "generations.jsonl").exists()


def test_resume_from_cache_generates_nothing(quick_run):
    _, first, second = quick_run  # the second run's decoders raise if they are used
    assert first["run"]["new_generations"] > 0 and first["run"]["cached_records"] == 0
    assert second["run"]["new_generations"] == 0
    assert second["run"]["cached_records"] >= first["run"]["new_generations"]
    assert second["results"] == first["results"] and second["utility"] == first["utility"]


def test_new_checkpoint_reuses_the_plain_systems_records(quick_run, tokenizer, tmp_path):
    import shutil

    import safety_eval.harness.run as run
    from ess.cli import main

    out, first, _ = quick_run
    shutil.copytree(out, tmp_path / "eval")
    models = tiny_models(tokenizer)
    models.model_ids["checkpoint"] = "another-ckpt"
    models.plain = _NoGeneration(models.plain)  # base, base+system_prompt and guard are cached
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "load_models", lambda checkpoint, base_dir, dtype: models)
        assert main(["eval", "--quick", "--limit", str(LIMIT), "--output", str(tmp_path / "eval"),
                     "--data-dir", str(DATA_DIR)]) == 0
    third = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert 0 < third["run"]["new_generations"] < first["run"]["new_generations"]
    plain = [r for r in first["results"] if r["system"] in ("base", "base+system_prompt", "guard")]
    assert plain and all(r in third["results"] for r in plain)


def test_unknown_system_is_one_line_error(tmp_path, capsys):
    from ess.cli import main

    assert main(["eval", "--systems", "nope", "--output", str(tmp_path), "--data-dir", str(DATA_DIR)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ess eval: error: unknown system(s) ['nope']")


def test_operating_points_at_the_run_threshold_match_the_result_rows(quick_run):
    from safety_eval.harness.report import SWEEP_PLOT

    out, res, _ = quick_run
    assert {sw["system"] for sw in res["operating_points"]} == {"ess/each/refuse", "ess/first/refuse"}
    rows = {(r["system"], r.get("attack") or r.get("benign_set")): r for r in res["results"]}
    for sw in res["operating_points"]:
        (run,) = [p for p in sw["points"] if p["run_threshold"]]
        assert run["exact"]
        for b, (lo, hi) in run["over_refusal"].items():
            assert lo == hi == rows[(sw["system"], b)]["refusal_rate"]
        for a, (lo, hi) in run["asr"].items():
            assert lo == hi == rows[(sw["system"], a)]["attack_success_rate"]
    types = [r for r in res["refusal_by_type"] if r["system"] == "base"]
    assert types and sum(r["n"] for r in types) == rows[("base", "xstest_safe")]["n"]
    md = (out / "results.md").read_text()
    assert "## Operating points of the safety head" in md and "## Over-refusal by prompt type (xstest_safe)" in md
    assert SWEEP_PLOT in res["plots"]
