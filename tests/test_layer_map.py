"""Layer maps (docs/FORMAT.md 7.1) and the relaxed schedule rules S3 / S4 (section 10).

GOOD_MAPS and BAD_MAPS are the one table of layer maps: the Python parser (lrq.plan.layer_map)
is checked against it here, and the C++ parser of ``--lrq-layers`` / ``Model(layers=...)`` is
meant to be checked against the same rows.  The expected (layer, replica) lists are written out
by hand from the specification's text, not computed by any parser.
"""

from __future__ import annotations

import pytest

from lrq.constants import MAX_EXECUTIONS
from lrq.plan import Execution, Plan, PlanError, layer_map, make_plan

# (map, n_layer, expected [(layer, replica), ...] of the executions in order)
GOOD_MAPS = [
    # full execution lists
    ("0..2", 3, [(0, 0), (1, 0), (2, 0)]),
    ("0,1,2", 3, [(0, 0), (1, 0), (2, 0)]),
    ("0..1,0..1", 2, [(0, 0), (1, 0), (0, 1), (1, 1)]),
    ("0..3,1..2", 4, [(0, 0), (1, 0), (2, 0), (3, 0), (1, 1), (2, 1)]),
    ("0..2,1", 3, [(0, 0), (1, 0), (2, 0), (1, 1)]),
    ("0, 1x3 ,2", 3, [(0, 0), (1, 0), (1, 1), (1, 2), (2, 0)]),      # spaces are ignored
    ("2,1,0", 3, [(2, 0), (1, 0), (0, 0)]),                          # any order
    ("0x2,1,0", 2, [(0, 0), (0, 1), (1, 0), (0, 2)]),
    ("0..0,1..1", 2, [(0, 0), (1, 0)]),                              # A == B
    ("00..01", 2, [(0, 0), (1, 0)]),                                 # decimal, leading zeros
    # repeat lists: every item NxK
    ("1x2", 3, [(0, 0), (1, 0), (1, 1), (2, 0)]),
    ("2x2,0x3", 3, [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (2, 1)]),
    ("0x1", 2, [(0, 0), (1, 0)]),
    ("1x1,2x2", 3, [(0, 0), (1, 0), (2, 0), (2, 1)]),
    (f"0x{MAX_EXECUTIONS - 1}", 2, [(0, r) for r in range(MAX_EXECUTIONS - 1)] + [(1, 0)]),
]

# (map, n_layer, substring the error must contain); every error also names the map and n_layer
BAD_MAPS = [
    ("", 3, "empty"),
    (" ", 3, "empty"),
    ("0..2,", 3, "item ''"),
    ("0,,1,2", 3, "item ''"),
    ("0..", 3, "item '0..'"),
    ("0...2", 3, "item '0...2'"),
    ("a", 3, "item 'a'"),
    ("0-2", 3, "item '0-2'"),
    ("1X2", 3, "item '1X2'"),
    ("x2", 3, "item 'x2'"),
    ("-1,0..2", 3, "item '-1'"),
    ("1.5", 3, "item '1.5'"),
    ("2..0", 3, "2 > 0"),
    ("1x0", 3, "K >= 1"),
    ("0..1,1x0,2", 3, "K >= 1"),
    ("0..3", 3, "layer 3 does not exist"),
    ("0..9", 3, "layer 3 does not exist"),           # the first layer of the item that is missing
    ("5..9", 3, "layer 5 does not exist"),
    ("3x2", 3, "layer 3 does not exist"),
    ("0,1,7", 3, "layer 7 does not exist"),
    ("0,2", 3, "layer(s) 1 never run"),
    ("1..2", 3, "layer(s) 0 never run"),
    ("0..1", 3, "layer(s) 2 never run"),
    ("1x2,1x3", 3, "layer 1 is named twice"),
    (f"0x{MAX_EXECUTIONS}", 2, f"{MAX_EXECUTIONS + 1} executions"),
    (f"0..1,0x{MAX_EXECUTIONS - 1}", 2, f"{MAX_EXECUTIONS + 1} executions"),
    ("0x4294967296", 2, "executions"),              # huge K: counted, never expanded
]


@pytest.mark.parametrize("spec,n_layer,want", GOOD_MAPS, ids=[g[0] or "empty" for g in GOOD_MAPS])
def test_good_layer_maps(spec, n_layer, want):
    p = layer_map(spec, n_layer)
    assert [(e.layer, e.replica) for e in p.executions] == want
    # one serial step of weight 1 per execution, group id = its index
    assert [e.group for e in p.executions] == list(range(len(want)))
    assert all(e.weight == 1.0 for e in p.executions)
    assert p.validate(n_layer).executions == p.executions
    # lrq-convert --plan takes the same string
    assert make_plan(spec, n_layer).executions == p.executions


@pytest.mark.parametrize("spec,n_layer,msg", BAD_MAPS, ids=[b[0][:20] or "empty" for b in BAD_MAPS])
def test_bad_layer_maps_name_the_map_and_the_layer_count(spec, n_layer, msg):
    with pytest.raises(PlanError) as ei:
        layer_map(spec, n_layer)
    text = str(ei.value)
    assert msg in text and f"'{spec}'" in text and f"{n_layer} layers" in text, text


def test_make_plan_prefers_presets_and_files_over_maps(tmp_path, monkeypatch):
    """A preset name and an existing file are never read as maps; anything else that is not a
    map keeps the unknown-preset message (which now mentions maps)."""
    assert make_plan("none", 3).executions == layer_map("0..2", 3).executions
    monkeypatch.chdir(tmp_path)
    (tmp_path / "1x2").write_text('{"layers": {"2": {"replicas": 3}}}')
    assert [e.layer for e in make_plan("1x2", 3).executions] == [0, 1, 2, 2, 2]
    with pytest.raises(PlanError, match="unknown plan preset 'someday'.*layer map"):
        make_plan("someday", 3)


# ---- the relaxed rules S3 / S4 ----------------------------------------------------------------

def _plan(rows):
    return Plan(tuple(Execution(l, r, g, w) for l, r, g, w in rows))


@pytest.mark.parametrize("rows", [
    [(0, 0, 0, 1.0), (1, 0, 1, 1.0), (0, 1, 2, 1.0), (1, 1, 3, 1.0)],        # revisits
    [(2, 0, 0, 1.0), (0, 0, 1, 1.0), (1, 0, 2, 1.0)],                        # any order
    [(1, 0, 0, 1.0), (0, 0, 1, 0.5), (0, 1, 1, 0.5), (2, 0, 2, 1.0), (0, 2, 3, 1.0)],
], ids=["revisit", "any-order", "parallel-then-back"])
def test_schedules_may_visit_layers_in_any_order(rows):
    p = _plan(rows).validate(3 if max(r[0] for r in rows) == 2 else 2)
    assert p.n_exec == len(rows)


@pytest.mark.parametrize("rows,msg", [
    ([(0, 0, 1, 1.0), (1, 0, 0, 1.0)], "group ids must be non-decreasing"),
    ([(0, 0, 0, 0.5), (1, 0, 0, 0.5)], "mixes layers"),
    ([(0, 0, 0, 0.5), (0, 0, 0, 0.5), (1, 0, 1, 1.0)], "runs a replica twice"),
    ([(1, 0, 0, 1.0), (1, 1, 1, 1.0)], "layer(s) 0 never run"),
    ([(0, 0, 0, 1.0), (1, 0, 1, 1.0), (0, 1, 1, 1.0)], "mixes layers"),       # group spans a revisit
    ([(0, 0, 0, 1.0)] + [(1, r, r + 1, 1.0) for r in range(MAX_EXECUTIONS)], "at most"),
])
def test_relaxed_rules_still_refuse(rows, msg):
    with pytest.raises(PlanError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        _plan(rows).validate(2, "sched.gguf")


def test_first_backstep():
    assert layer_map("0..2", 3).first_backstep() is None
    assert layer_map("1x3", 3).first_backstep() is None
    assert layer_map("0..1,0..1", 2).first_backstep() == 2
    assert layer_map("1,0", 2).first_backstep() == 1
