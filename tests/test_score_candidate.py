"""scripts/score-candidate.sh: the commands it runs for a candidate, checked with ``echo`` in
place of Python (the measures themselves are tested with their benchmarks)."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "score-candidate.sh"


def _run(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


def test_it_names_its_arguments_when_they_are_missing():
    out = _run("only-one")
    assert out.returncode == 2 and "usage: bash scripts/score-candidate.sh CANDIDATE_DIR TRAIN_CONFIG OUT_DIR" in out.stderr


def test_it_scores_the_candidate_beside_the_reference_on_every_measure(tmp_path):
    out = _run("ck", "cfg.yaml", str(tmp_path / "out"),
               env={"PATH": "/usr/bin:/bin", "PY": "echo", "ESS": "echo", "REFERENCE": "ref"})
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line for line in out.stdout.splitlines() if not line.startswith("===")]
    held_ref, held, *pairs, agreement, self_refusal, integration, done = lines
    assert held_ref.startswith("-m benchmarks.held_out --config cfg.yaml --checkpoint ref")
    assert f"--match-fpr {tmp_path}/out/held_out_reference.json" in held
    assert len(pairs) == 5 and all("--checkpoint ref ck" in p for p in pairs)
    assert "--pairs data/contrast_styles " in pairs[-1]
    assert sum("--surface cyrillic" in p for p in pairs) == 2
    assert "data/contrast_long/elections.jsonl" in pairs[0] and "data/contrast_words/hate.jsonl" in pairs[1]
    assert agreement.startswith("bench agreement --checkpoint ck")
    assert "benchmarks.self_refusal --checkpoint ck --config cfg.yaml" in self_refusal
    assert integration == "-m pytest -q -m integration -p no:cacheprovider"
    assert done.startswith("every step ran")


def test_a_failing_step_is_named_and_the_rest_still_run(tmp_path):
    out = _run("ck", "cfg.yaml", str(tmp_path / "out"), env={"PATH": "/usr/bin:/bin", "PY": "false", "ESS": "echo"})
    assert out.returncode == 1
    assert "bench agreement --checkpoint ck" in out.stdout  # ran after the failed ones
    assert out.stdout.strip().splitlines()[-1] == (
        "failed: held_out_reference held_out pairs_long pairs_words pairs_long_cyrillic "
        "pairs_words_cyrillic pairs_styles self_refusal integration")


def test_skip_leaves_out_the_named_steps_only(tmp_path):
    out = _run("ck", "cfg.yaml", str(tmp_path / "out"),
               env={"PATH": "/usr/bin:/bin", "PY": "echo", "ESS": "echo", "SKIP": "held_out integration"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "=== held_out: skipped (SKIP)" in out.stdout and "=== integration: skipped (SKIP)" in out.stdout
    ran = [line for line in out.stdout.splitlines() if not line.startswith("===")]
    assert ran[0].startswith("-m benchmarks.held_out --config cfg.yaml --checkpoint ")  # the reference still runs
    assert not any("--match-fpr" in line or line.startswith("-m pytest") for line in ran)
    assert len(ran) == 1 + 5 + 2 + 1  # reference, five pair runs, agreement, self-refusal, the closing line
