"""The profile summary's pure parts: operation kinds and self times of nested events."""

from benchmarks.profile_step import operation_kind, self_times


def test_operation_kind_drops_the_instance_number():
    assert operation_kind("fusion.12") == "fusion"
    assert operation_kind("loop_add_fusion.1") == "loop_add_fusion"
    assert operation_kind("MatMul_3.46") == "MatMul_"
    assert operation_kind("ThunkExecutor::Execute") == "ThunkExecutor"


def test_self_times_subtract_nested_events_once():
    # A wrapper 0-100 holds a 10-40 event (itself holding 20-30) and a 50-90 event; a
    # separate event follows at 100.
    events = [
        ("wrapper", 0, 100), ("dot", 10, 30), ("inner", 20, 10), ("fusion", 50, 40),
        ("after", 100, 5),
    ]
    times = dict(self_times(events))
    assert times == {"wrapper": 30, "dot": 20, "inner": 10, "fusion": 40, "after": 5}
    assert sum(times.values()) == 105  # the covered wall time, counted once
