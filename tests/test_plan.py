"""Replication plans: presets, explicit JSON / YAML files, validation, GGUF key arrays."""

from __future__ import annotations

import json

import pytest

from lrq.constants import Keys
from lrq.plan import Execution, Plan, PlanError, make_plan

N_LAYER = 30


def _counts(plan):
    c = {}
    for e in plan.executions:
        c[e.layer] = c.get(e.layer, 0) + 1
    return c


def test_preset_none_runs_every_layer_once():
    p = make_plan("none", N_LAYER)
    assert [(e.layer, e.replica) for e in p.executions] == [(l, 0) for l in range(N_LAYER)]
    assert [e.group for e in p.executions] == list(range(N_LAYER))
    assert all(e.weight == 1.0 for e in p.executions)


def test_preset_all_and_last_n():
    p = make_plan("all", N_LAYER)
    assert p.n_exec == 2 * N_LAYER
    assert [(e.layer, e.replica) for e in p.executions[:4]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len({e.group for e in p.executions}) == p.n_exec        # all serial
    p = make_plan("last-8", N_LAYER)
    assert _counts(p) == {l: (2 if l >= 22 else 1) for l in range(N_LAYER)}
    assert p.replicas(25) == [0, 1] and p.replicas(21) == [0]


def test_preset_progressive_thirds():
    p = make_plan("progressive", N_LAYER)
    assert _counts(p) == {l: 1 if l < 10 else 2 if l < 20 else 3 for l in range(N_LAYER)}
    assert p.replicas(29) == [0, 1, 2]


@pytest.mark.parametrize("spec,msg", [("last-0", "N must be in 1..30"), ("last-31", "N must be in 1..30"),
                                      ("sometimes", "unknown plan preset 'sometimes'")])
def test_bad_presets(spec, msg):
    with pytest.raises(PlanError, match=msg):
        make_plan(spec, N_LAYER)


def test_explicit_json_serial_and_parallel(tmp_path):
    f = tmp_path / "plan.json"
    f.write_text(json.dumps({"layers": {"27": {"replicas": 2, "mode": "serial"},
                                        "28": {"replicas": 3, "mode": "parallel"},
                                        "29": {"replicas": 2, "mode": "parallel", "weights": [0.75, 0.25]}}}))
    p = make_plan(str(f), N_LAYER)
    tail = p.executions[27:]
    assert [(e.layer, e.replica) for e in tail] == [(27, 0), (27, 1), (28, 0), (28, 1), (28, 2), (29, 0), (29, 1)]
    groups = p.groups()
    assert [len(g) for g in groups[-4:]] == [1, 1, 3, 2]
    assert [e.weight for e in groups[-2]] == pytest.approx([1 / 3] * 3)
    assert [e.weight for e in groups[-1]] == [0.75, 0.25]
    assert p.source == str(f)


def test_explicit_yaml(tmp_path):
    f = tmp_path / "plan.yaml"
    f.write_text("layers:\n  3:\n    replicas: 2\n    mode: parallel\n")
    p = make_plan(str(f), 4)
    assert [(e.layer, e.replica, e.group) for e in p.executions] == [(0, 0, 0), (1, 0, 1), (2, 0, 2), (3, 0, 3), (3, 1, 3)]


@pytest.mark.parametrize("content,msg", [
    ({"layers": {"99": {"replicas": 2}}}, "layer 99 does not exist in a model with 30 layers"),
    ({"layers": {"x": {"replicas": 2}}}, "layer key 'x' is not an integer"),
    ({"layers": {"3": {"replicas": 0}}}, "replicas must be an integer >= 1"),
    ({"layers": {"3": {"replicas": 2, "mode": "sideways"}}}, "mode must be 'serial' or 'parallel'"),
    ({"layers": {"3": {"replicas": 2, "copies": 1}}}, "unknown field"),
    ({"layers": {"3": {"replicas": 2, "mode": "parallel", "weights": [0.9, 0.9]}}}, "sum to"),
    ({"layers": {"3": {"replicas": 2, "weights": [0.5, 0.5]}}}, "only meaningful with mode 'parallel'"),
    ({"layer": {}}, "expected an object"),
])
def test_bad_plan_files_name_file_and_layer(tmp_path, content, msg):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(content))
    with pytest.raises(PlanError) as ei:
        make_plan(str(f), N_LAYER)
    assert msg in str(ei.value) and str(f) in str(ei.value)


def test_unreadable_and_missing_plan_files(tmp_path):
    f = tmp_path / "broken.json"
    f.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        make_plan(str(f), N_LAYER)
    with pytest.raises(PlanError, match="does not exist"):
        make_plan(str(tmp_path / "nope.yaml"), N_LAYER)


def test_gguf_arrays_round_trip():
    p = make_plan("progressive", 9)
    arrays = p.to_gguf_arrays()
    assert set(arrays) == {Keys.SCHEDULE_LAYER, Keys.SCHEDULE_REPLICA, Keys.SCHEDULE_GROUP, Keys.SCHEDULE_WEIGHT}
    back = Plan.from_gguf_arrays(arrays).validate(9)
    assert back.executions == p.executions
    arrays[Keys.SCHEDULE_GROUP] = arrays[Keys.SCHEDULE_GROUP][:-1]
    with pytest.raises(PlanError, match="differ in length"):
        Plan.from_gguf_arrays(arrays)


@pytest.mark.parametrize("ex,msg", [
    ([Execution(0, 0, 0), Execution(2, 0, 1)], "layer(s) 1 never run"),
    ([Execution(0, 0, 1), Execution(1, 0, 0), Execution(2, 0, 2)], "group ids must be non-decreasing"),
    ([Execution(0, 0, 0), Execution(1, 0, 1), Execution(1, 1, 1), Execution(2, 0, 1)], "mixes layers"),
    ([Execution(0, 0, 0), Execution(1, 1, 1), Execution(1, 1, 1), Execution(2, 0, 2)], "runs a replica twice"),
    ([Execution(0, 0, 0), Execution(1, 0, 1), Execution(5, 0, 2)], "layer 5 does not exist"),
])
def test_schedule_validation(ex, msg):
    with pytest.raises(PlanError) as ei:
        Plan(tuple(ex)).validate(3, "sched.gguf")
    assert msg in str(ei.value) and "sched.gguf" in str(ei.value)
