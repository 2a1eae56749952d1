"""One notion of a direction (query expert, key expert, window) for bca, lateral and lavish."""

from __future__ import annotations

import pytest

from fusionkit.attention import TokenLayout
from fusionkit.fusion.bca import BCA
from fusionkit.fusion.directions import Direction, parse_directions
from fusionkit.fusion.lateral import Lateral
from fusionkit.fusion.lavish import LAVISH

LAYOUT = TokenLayout(2, 2, 2, extras=1)


def test_both_forms_and_the_default_give_the_same_directions():
    named = parse_directions("op", ["v", "a"], {"a_to_v": {"query": "v", "key": "a"},
                                                "v_to_a": {"query": "a", "key": "v"}})
    short = parse_directions("op", ["v", "a"], ["a->v", "v->a"])
    default = parse_directions("op", ["v", "a"], None)
    assert named == short == default == {"a_to_v": Direction("v", "a", "global"), "v_to_a": Direction("a", "v", "global")}
    assert parse_directions("op", ["v", "a"], "a->v", window=None) == {"a_to_v": Direction("v", "a", None)}
    spec = {"t2s": {"query": "s", "key": "t", "window": "time", "position": "time"}, "s2t": None}
    assert parse_directions("op", ["s", "t"], spec, options=("position",)) == \
        {"t2s": Direction("s", "t", "time", {"position": "time"})}


@pytest.mark.parametrize("spec,message", [
    (["a=>v"], "direction 'a=>v' must read 'key->query'"),
    (["a->v", " a -> v"], "direction listed twice"),
    ({"x": {"query": "v", "key": "z"}}, "direction 'x': key 'z' is not one of the joined experts \\['v', 'a'\\]"),
    ({"x": {"query": "v"}}, "direction 'x' takes query, key, window; got \\['query'\\]"),
    ({"x": {"query": "v", "key": "a", "position": "time"}}, "takes query, key, window; got"),
    ({"x": {"query": "v", "key": "v"}}, "query and key are both 'v'"),
    ({"x": None}, "op: no directions given"),
])
def test_direction_errors_name_the_direction(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_directions("op", ["v", "a"], spec)


def test_bca_lateral_and_lavish_read_one_syntax():
    dims, layouts = {"v": 16, "a": 16}, {"v": LAYOUT, "a": LAYOUT}
    for spec in (["a->v"], {"a_to_v": {"query": "v", "key": "a"}}):
        bca = BCA(experts=["v", "a"], dims=dims, layouts=layouts, heads=2, directions=spec)
        lateral = Lateral(experts=["v", "a"], dims=dims, layouts=layouts, directions=spec)
        lavish = LAVISH(experts=["v", "a"], dims=dims, layouts=layouts, directions=spec)
        assert bca.directions["a_to_v"][:2] == ("v", "a") and bca.directions["a_to_v"][2].name == "global"
        assert lateral.directions == {"a_to_v": ("a", "v")}
        assert lavish.pairs == {"a_to_v": ("a", "v")} and list(lavish.attn_adapters) == ["a_to_v"]
    with pytest.raises(ValueError, match="lateral direction 'x' takes query, key; got"):
        Lateral(experts=["v", "a"], dims=dims, layouts=layouts, directions={"x": {"query": "v", "key": "a", "window": "time"}})
    lavish = LAVISH(experts=["v", "a"], dims=dims, layouts=layouts, directions=["a->a"])  # uni-modal ablation
    assert lavish.pairs == {"a_to_a": ("a", "a")}


def test_lavish_window_per_direction_overrides_the_default():
    dims, layouts = {"v": 16, "a": 16}, {"v": LAYOUT, "a": LAYOUT}
    op = LAVISH(experts=["v", "a"], dims=dims, layouts=layouts, window="space",
                directions={"a_to_v": {"query": "v", "key": "a", "window": "global"}, "v_to_a": {"query": "a", "key": "v"}})
    assert op.windows == {"a_to_v": "global", "v_to_a": "space"}
    with pytest.raises(ValueError, match="lavish: unknown window 'time' \\(direction 'a_to_v'\\)"):
        LAVISH(experts=["v", "a"], dims=dims, layouts=layouts, directions={"a_to_v": {"query": "v", "key": "a", "window": "time"}})
