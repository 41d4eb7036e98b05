import pytest

from safety_decoding.policy import SafetyParams, SafetyState
from safety_decoding.types import ParameterError


def run(scores, **kw):
    """Feed scripted re-check scores; return (state, trips as (step, Trip))."""
    s = SafetyState(SafetyParams(**kw))
    assert s.on_query(0.1) is None
    trips = []
    for n, score in enumerate(scores, start=1):
        t = s.on_check(score, n)
        if t:
            trips.append((n, t))
    return s, trips


def test_malicious_query_trips_at_response_start():
    s = SafetyState(SafetyParams())
    trip = s.on_query(0.9)
    assert trip.stage == "query" and trip.truncate_to == 0
    assert s.refused and not s.active


def test_benign_query_no_trip_and_releases_all_but_newest():
    s, trips = run([0.1, 0.2, 0.3])  # the check at n=3 covers g_0..g_2
    assert trips == [] and s.releasable(4) == 3  # g_3 waits for its check


def test_tau_consecutive_malicious_checks_trip_at_s_t():
    s, trips = run([0.1, 0.9, 0.8, 0.95], tau=3)
    (step, trip), = trips
    assert step == 4 and trip.stage == "response"
    assert trip.truncate_to == 1  # S_t: newest token of the first malicious window (g_1)


def test_streak_reset_by_a_benign_check():
    s, trips = run([0.9, 0.9, 0.1, 0.9, 0.9], tau=3)
    assert trips == [] and s.streak == 2


def test_tokens_of_a_malicious_streak_are_held():
    s, _ = run([0.1, 0.1, 0.9], tau=3)
    assert s.releasable(4) == 2  # g_2 is covered by the failed check


def test_finish_during_streak_trips():
    s, _ = run([0.1, 0.9], tau=3)
    trip = s.on_finish()
    assert trip and trip.truncate_to == 1


def test_monitor_reports_would_trip_but_never_intervenes():
    s = SafetyState(SafetyParams(action="monitor"))
    assert s.on_query(0.99) is None
    assert s.summary()["would_trip"] == ["query"] and not s.summary()["intervened"]


def test_monitor_holds_nothing_back_and_counts_no_reweights():
    """Shadow mode never changes the output, so a malicious streak delays no token."""
    s = SafetyState(SafetyParams(action="monitor", tau=3))
    s.on_query(0.1)
    for n in range(1, 4):
        s.on_check(0.9, n)
        assert s.releasable(n) == n
    assert s.on_finish() is None
    assert s.summary()["reweights"] == 0 and "response" in s.summary()["would_trip"]


def test_first_schedule_never_rechecks():
    s = SafetyState(SafetyParams(schedule="first"))
    s.on_query(0.1)
    assert not s.needs_check(5) and s.releasable(5) == 5


def test_windows_rule2_recent_and_rule1_first():
    s = SafetyState(SafetyParams(r1=4, r2=3, action="monitor"))
    s.on_query(0.1)
    assert s.window(10) == (7, 10)
    s2 = SafetyState(SafetyParams(r1=4, r2=3, action="monitor"))
    s2.on_query(0.9)
    assert s2.window(10) == (0, 4)


def test_threshold_is_strict_greater():
    s = SafetyState(SafetyParams(threshold=0.5))
    assert s.on_query(0.5) is None


def test_stricter_only():
    p = SafetyParams(threshold=0.5, schedule="first")
    assert p.stricter(threshold=0.3, schedule="each").threshold == 0.3
    with pytest.raises(ParameterError) as e:
        p.stricter(threshold=0.7)
    assert e.value.field == "threshold"
    with pytest.raises(ParameterError) as e:
        SafetyParams(schedule="each").stricter(schedule="first")
    assert e.value.field == "schedule"


@pytest.mark.parametrize("kw,field", [({"threshold": 1.5}, "threshold"), ({"tau": 0}, "tau"),
                                      ({"schedule": "sometimes"}, "schedule"),
                                      ({"action": "explode"}, "action")])
def test_invalid_params_name_the_field(kw, field):
    with pytest.raises(ParameterError) as e:
        SafetyParams(**kw)
    assert e.value.field == field


def test_periodic_checks_every_k_and_holds_until_cleared():
    s = SafetyState(SafetyParams(schedule="periodic", period=4))
    s.on_query(0.1)
    assert [n for n in range(1, 13) if s.needs_check(n)] == [4, 8, 12]
    assert s.releasable(3) == 0  # nothing cleared yet: held for the check at 4
    s.on_check(0.1, 4)
    assert s.releasable(6) == 4


def test_periodic_trip_truncates_to_first_uncleared_token():
    s = SafetyState(SafetyParams(schedule="periodic", period=4, tau=2))
    s.on_query(0.1)
    s.on_check(0.1, 4)
    assert s.on_check(0.9, 8) is None
    trip = s.on_check(0.9, 12)
    assert trip.truncate_to == 4  # g_4..g_7 were covered only by failing checks


def test_annealing_is_dense_early_sparser_later_then_stops():
    from safety_decoding.policy import annealing_steps

    p = SafetyParams(schedule="annealing", anneal_dense=8, anneal_growth=1.5, anneal_horizon=100)
    steps = sorted(annealing_steps(p.anneal_dense, p.anneal_growth, p.anneal_horizon))
    assert steps[:8] == list(range(1, 9))
    gaps = [b - a for a, b in zip(steps[8:], steps[9:])]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0] and max(steps) <= 100
    s = SafetyState(p)
    s.on_query(0.1)
    assert not s.needs_check(max(steps) + 1) and s.releasable(150) == 150  # past the horizon


def test_rule3_window_spans_the_transition_during_a_streak():
    s = SafetyState(SafetyParams(r2=3, r3=2, tau=5))
    s.on_query(0.1)
    for n in range(1, 6):
        s.on_check(0.1, n)
    s.on_check(0.9, 6)  # S_t = 5
    assert s.window(7) == (2, 7)  # [S_t - r2, S_t + r3] clipped to what exists
    assert s.window(20) == (2, 8)
    s.on_check(0.1, 7)  # the malicious state did not persist: back to rule 2
    assert s.window(10) == (7, 10)


def test_action_override_only_stricter():
    assert SafetyParams(action="monitor").stricter(action="refuse").action == "refuse"
    with pytest.raises(ParameterError) as e:
        SafetyParams(action="refuse").stricter(action="monitor")
    assert e.value.field == "action"


def test_reweight_bias_grows_with_confidence_and_repeats_then_falls_back():
    s = SafetyState(SafetyParams(action="reweight", reweight_strength=8.0, tau=1))
    s.on_query(0.1)
    assert s.on_check(0.6, 1) and s.steering
    weak = s.steer_bias
    s2 = SafetyState(SafetyParams(action="reweight", reweight_strength=8.0, tau=1))
    s2.on_query(0.1)
    s2.on_check(0.99, 1)
    assert s2.steer_bias > weak
    s2.on_check(0.99, 2)
    assert s2.steer_bias > 1.9 * 8.0 * 0.97 and s2.steering
    s2.on_check(0.99, 3)
    assert s2.on_check(0.99, 4) and s2.refused and not s2.steering  # fourth trip: insert


def test_probe_windows_reach_back_into_a_prefill():
    s = SafetyState(SafetyParams(r1=4, r2=3, r3=2), prefill=5)
    assert s.window(0) == (-3, 0)  # rule 2 before any generated token: the prefill's tail
    assert s.window(10) == (7, 10)
    s.on_query(0.9)  # rule 1: the first r1 response tokens, the prefill's first
    assert s.window(10) == (-5, -1)
    assert SafetyState(SafetyParams(r2=3)).window(1) == (0, 1)  # no prefill: as before
