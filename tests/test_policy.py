import pytest

from safety_decoding.policy import SafetyParams, SafetyState
from safety_decoding.sampling import ParameterError


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
    s, trips = run([0.1, 0.2, 0.3])
    assert trips == [] and s.releasable(3) == 2


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
    assert s.releasable(3) == 2  # g_2 is covered by the failed check


def test_finish_during_streak_trips():
    s, _ = run([0.1, 0.9], tau=3)
    trip = s.on_finish()
    assert trip and trip.truncate_to == 1


def test_monitor_reports_would_trip_but_never_intervenes():
    s = SafetyState(SafetyParams(action="monitor"))
    assert s.on_query(0.99) is None
    assert s.summary()["would_trip"] == ["query"] and not s.summary()["intervened"]


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
