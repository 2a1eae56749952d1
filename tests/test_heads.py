"""Heads: parameter counts and names, init, forward, losses against hand-computed values, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import fusionkit.heads  # noqa: F401 - registers the heads
from fusionkit.heads import AdapterSumHead, Head, LinearHead, total_loss
from fusionkit.registry import HEADS

REFERENCE = Path(__file__).resolve().parent / "data" / "cast_official" / "cast_official_single_head_400.tsv"
CAST = {"spatial": 768, "temporal": 768}
AV = {"audio": 768, "visual": 512}


def nparams(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def feats(dims: dict[str, int], batch: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {e: torch.randn(batch, d, generator=gen) for e, d in dims.items()}


def test_registry_names():
    assert {"linear", "adapter_sum", "concat", "sum", "mlp"} <= set(HEADS.names())
    for name in ("linear", "adapter_sum", "concat", "sum", "mlp"):
        entry = next(e for e in HEADS.entries() if e.name == name)
        assert issubclass(entry.obj, Head) and entry.obj.kind == name
        assert entry.description  # first docstring line, shown by `fusionkit list`


def test_parameter_counts_and_names():
    verb = HEADS.build("linear", dims=CAST, expert="temporal", classes=97)
    noun = HEADS.build("linear", dims=CAST, expert="spatial", classes=300)
    assert nparams(verb) == 768 * 97 + 97 and nparams(noun) == 768 * 300 + 300
    assert [n for n, _ in verb.named_parameters()] == ["fc.weight", "fc.bias"]

    single = HEADS.build("adapter_sum", dims=CAST, experts=["spatial", "temporal"], classes=400)
    # official CAST single head: noun_last_Adapter + verb_last_Adapter + head
    assert nparams(single) == 2 * (768 * 192 + 192 + 192 * 768 + 768) + 768 * 400 + 400 == 899_344
    assert {n: tuple(p.shape) for n, p in single.named_parameters()} == {
        **{f"adapters.{e}.D_fc1.weight": (192, 768) for e in CAST},
        **{f"adapters.{e}.D_fc1.bias": (192,) for e in CAST},
        **{f"adapters.{e}.D_fc2.weight": (768, 192) for e in CAST},
        **{f"adapters.{e}.D_fc2.bias": (768,) for e in CAST},
        "fc.weight": (400, 768), "fc.bias": (400,),
    }
    assert nparams(HEADS.build("adapter_sum", dims=CAST, experts=["spatial", "temporal"], classes=400,
                               ratio=0.5)) == 2 * (768 * 384 * 2 + 384 + 768) + 768 * 400 + 400

    concat = HEADS.build("concat", dims=AV, experts=["audio", "visual"], classes=10)
    assert nparams(concat) == (768 + 512) * 10 + 10
    summed = HEADS.build("sum", dims=AV, experts=["audio", "visual"], classes=10)
    assert nparams(summed) == 768 * 10 + 10 + 512 * 10 + 10
    assert sorted(n for n, _ in summed.named_parameters()) == [
        "fcs.audio.bias", "fcs.audio.weight", "fcs.visual.bias", "fcs.visual.weight"]
    mlp = HEADS.build("mlp", dims=AV, experts=["audio", "visual"], classes=29, hidden=512)
    assert nparams(mlp) == (768 + 512) * 512 + 512 + 512 * 29 + 29


@pytest.mark.skipif(not REFERENCE.exists(), reason="official CAST key layout not available")
def test_adapter_sum_matches_official_single_head_layout():
    official = {}
    for line in REFERENCE.read_text().splitlines()[1:]:
        key, shape, _ = line.split("\t")
        if key.startswith(("noun_last_Adapter", "verb_last_Adapter", "head.")):
            official[key] = tuple(int(s) for s in shape.split("x"))
    rename = {"noun_last_Adapter": "adapters.spatial", "verb_last_Adapter": "adapters.temporal", "head": "fc"}
    head = AdapterSumHead(dims=CAST, experts=["spatial", "temporal"], classes=400)
    ours = {n: tuple(p.shape) for n, p in head.named_parameters()}
    assert len(official) == 10
    assert {rename[k.split(".")[0]] + k[k.index("."):]: s for k, s in official.items()} == ours


def test_adapter_sum_is_bias_at_init_and_changes_once_up_projection_nonzero():
    torch.manual_seed(0)
    head = AdapterSumHead(dims=CAST, experts=["spatial", "temporal"], classes=7).eval()
    x = feats(CAST)
    assert torch.count_nonzero(head.fc.bias) == 0 and torch.count_nonzero(head(x)) == 0
    with torch.no_grad():
        head.fc.bias.copy_(torch.arange(7.0))
    assert torch.equal(head(x), head.fc(torch.zeros(3, 768)))
    assert torch.equal(head(x), torch.arange(7.0).expand(3, 7))
    with torch.no_grad():
        head.adapters["temporal"].D_fc2.weight.normal_()
    out = head(x)
    assert not torch.allclose(out, head.fc.bias.expand(3, 7))
    # the sum over experts: only the temporal adapter acts, so spatial features do not matter
    y = dict(x, spatial=torch.randn(3, 768))
    assert torch.allclose(head(y), out)
    assert not torch.allclose(head(dict(x, temporal=torch.randn(3, 768))), out)


def test_init_scale_scales_weight_and_bias():
    torch.manual_seed(0)
    plain = LinearHead(dims=CAST, expert="temporal", classes=97)
    torch.manual_seed(0)
    scaled = LinearHead(dims=CAST, expert="temporal", classes=97, init_scale=0.001)
    assert torch.allclose(scaled.fc.weight, plain.fc.weight * 0.001)
    # trunc_normal_(std=0.02) cuts at ±2 absolute (as timm's, used by CAST): a plain normal in practice
    assert scaled.fc.weight.abs().max() < 0.001 * 6 * 0.02
    assert torch.count_nonzero(scaled.fc.bias) == 0
    assert 0.015 < float(plain.fc.weight.detach().std()) < 0.025
    for kind, kw in (("adapter_sum", {"experts": ["spatial", "temporal"]}), ("concat", {"experts": ["spatial"]}),
                     ("sum", {"experts": ["spatial", "temporal"]}), ("mlp", {"experts": ["spatial"], "hidden": 8})):
        torch.manual_seed(1)
        a = HEADS.build(kind, dims=CAST, classes=5, **kw)
        torch.manual_seed(1)
        b = HEADS.build(kind, dims=CAST, classes=5, init_scale=0.5, **kw)
        last = {"sum": "fcs.temporal.weight", "mlp": "fc2.weight"}.get(kind, "fc.weight")
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        assert torch.allclose(pb[last], pa[last] * 0.5), kind
        if kind == "mlp":
            assert torch.equal(pa["fc1.weight"], pb["fc1.weight"])  # only the classifier layer is scaled


def test_forward_shapes_inputs_and_late_fusion_semantics():
    x = feats(AV, batch=4)
    concat = HEADS.build("concat", dims=AV, experts=["visual", "audio"], classes=6, pool={"audio": "extras"})
    assert concat.inputs == {"visual": None, "audio": "extras"} and list(concat.inputs) == ["visual", "audio"]
    out = concat(x)
    assert out.shape == (4, 6)
    cat = torch.cat([x["visual"], x["audio"]], dim=1)  # order of `experts`
    assert torch.allclose(out, cat @ concat.fc.weight.T + concat.fc.bias)

    summed = HEADS.build("sum", dims=AV, experts=["audio", "visual"], classes=6, pool="avg")
    assert summed.inputs == {"audio": "avg", "visual": "avg"}
    with torch.no_grad():
        for fc in summed.fcs.values():
            fc.bias.normal_()
    expected = summed.fcs["audio"](x["audio"]) + summed.fcs["visual"](x["visual"])
    assert torch.allclose(summed(x), expected)

    mlp = HEADS.build("mlp", dims=AV, experts=["audio", "visual"], classes=6, hidden=16, act="none")
    h = torch.cat([x["audio"], x["visual"]], 1) @ mlp.fc1.weight.T + mlp.fc1.bias
    assert torch.allclose(mlp(x), mlp.fc2(h), atol=1e-6)
    gelu = HEADS.build("mlp", dims=AV, experts=["audio", "visual"], classes=6, hidden=16)
    gelu.load_state_dict(mlp.state_dict())
    assert not torch.allclose(gelu(x), mlp(x))

    lin = HEADS.build("linear", dims=AV, expert="audio", classes=6, multilabel=True)
    assert lin.inputs == {"audio": None} and lin.multilabel and lin.num_classes == 6
    assert lin(x).shape == (4, 6)  # extra features of other experts are ignored


def test_dropout_acts_in_train_only():
    head = HEADS.build("linear", dims=CAST, expert="spatial", classes=5, dropout=0.5)
    x = feats(CAST, batch=8)
    torch.manual_seed(0)
    assert not torch.allclose(head.train()(x), head.eval()(x))
    assert torch.equal(head.eval()(x), head.fc(x["spatial"]))


def logsoftmax(row: list[float]) -> list[float]:
    lse = math.log(sum(math.exp(v) for v in row))
    return [v - lse for v in row]


def test_cross_entropy_with_label_smoothing_hand_computed():
    head = LinearHead(dims=CAST, expert="spatial", classes=3, label_smoothing=0.1)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    target = torch.tensor([0, 2])
    expected = 0.0
    for row, y in zip(logits.tolist(), target.tolist()):
        lp = logsoftmax(row)
        q = [0.9 * (i == y) + 0.1 / 3 for i in range(3)]
        expected += -sum(qi * li for qi, li in zip(q, lp)) / 2
    assert head.loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    plain = LinearHead(dims=CAST, expert="spatial", classes=3)
    assert plain.loss(logits, target).item() == pytest.approx(
        -(logsoftmax([2.0, 0.0, -1.0])[0] + logsoftmax([0.5, 1.5, 0.0])[2]) / 2, rel=1e-6)


def test_soft_target_cross_entropy_hand_computed():
    head = LinearHead(dims=CAST, expert="spatial", classes=3, label_smoothing=0.1)
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    soft = torch.tensor([[0.7, 0.3, 0.0]])  # mixup of classes 0 and 1, unsmoothed
    lp = logsoftmax([2.0, 0.0, -1.0])
    q = [0.9 * t + 0.1 / 3 for t in (0.7, 0.3, 0.0)]
    assert head.loss(logits, soft).item() == pytest.approx(-sum(a * b for a, b in zip(q, lp)), rel=1e-6)
    # a one-hot soft target equals the class-id target
    assert head.loss(logits, torch.tensor([[0.0, 1.0, 0.0]])).item() == pytest.approx(
        head.loss(logits, torch.tensor([1])).item(), rel=1e-6)


def test_multilabel_bce_hand_computed():
    head = LinearHead(dims=CAST, expert="spatial", classes=2, multilabel=True)
    logits = torch.tensor([[0.0, 2.0]])
    target = torch.tensor([[1.0, 0.0]])
    expected = (math.log(2.0) + math.log(1 + math.exp(2.0))) / 2
    assert head.loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    assert head.loss(logits, target.bool()).item() == pytest.approx(expected, rel=1e-6)
    smooth = LinearHead(dims=CAST, expert="spatial", classes=2, multilabel=True, label_smoothing=0.2)
    # targets 0.9 / 0.1: BCE(z, t) = log(1 + e^z) - t z
    expected = ((math.log(2.0) - 0.0) + (math.log(1 + math.exp(2.0)) - 0.1 * 2.0)) / 2
    assert smooth.loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_loss_shape_errors_name_head_and_shapes():
    head = LinearHead(dims=CAST, expert="spatial", classes=3, name="noun")
    with pytest.raises(ValueError, match=r"head 'noun' \(linear\).*\(B, 3\).*\(2, 4\)"):
        head.loss(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"head 'noun'.*\(2,\).*\(2, 3\).*\(3,\)"):
        head.loss(torch.zeros(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"head 'noun'.*\[0, 3\).*\[0, 5\]"):
        head.loss(torch.zeros(2, 3), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"head 'noun'.*integer"):
        head.loss(torch.zeros(2, 3), torch.tensor([0.0, 1.0]))
    ml = LinearHead(dims=CAST, expert="spatial", classes=3, multilabel=True)
    with pytest.raises(ValueError, match=r"linear head: multi-label target must be \(B, classes\) = \(2, 3\).*\(2,\)"):
        ml.loss(torch.zeros(2, 3), torch.tensor([0, 1]))


def test_forward_errors_name_head_expert_and_shapes():
    head = HEADS.build("concat", dims=AV, experts=["audio", "visual"], classes=3, name="event")
    with pytest.raises(KeyError, match=r"head 'event' \(concat\).*'visual'.*\['audio'\]"):
        head({"audio": torch.zeros(2, 768)})
    with pytest.raises(ValueError, match=r"head 'event'.*'visual' must be \(B, 512\).*\(2, 768\)"):
        head({"audio": torch.zeros(2, 768), "visual": torch.zeros(2, 768)})
    with pytest.raises(ValueError, match=r"batch size.*'visual' has 3, expected 2"):
        head({"audio": torch.zeros(2, 768), "visual": torch.zeros(3, 512)})


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"adapter_sum.*one width.*'audio': 768.*'visual': 512"):
        HEADS.build("adapter_sum", dims=AV, experts=["audio", "visual"], classes=3)
    with pytest.raises(KeyError, match=r"'depth'.*\['audio', 'visual'\]"):
        HEADS.build("linear", dims=AV, expert="depth", classes=3)
    with pytest.raises(TypeError):
        HEADS.build("linear", dims=AV, expert=["audio"], classes=3)
    with pytest.raises(TypeError):
        LinearHead(AV, "audio", 3)  # keyword arguments only
    with pytest.raises(ValueError, match="classes"):
        HEADS.build("linear", dims=AV, expert="audio", classes=0)
    with pytest.raises(KeyError, match="pool modes given for experts \\['visual'\\]"):
        HEADS.build("concat", dims=AV, experts=["audio"], classes=3, pool={"visual": "cls"})
    with pytest.raises(ValueError, match="unknown act"):
        HEADS.build("mlp", dims=AV, experts=["audio"], classes=3, act="swish")


def test_total_loss_sums_heads_and_names_missing_target():
    heads = {"verb": LinearHead(dims=CAST, expert="temporal", classes=4),
             "noun": LinearHead(dims=CAST, expert="spatial", classes=5)}
    x = feats(CAST, batch=2)
    logits = {k: h(x) for k, h in heads.items()}
    targets = {"verb": torch.tensor([0, 3]), "noun": torch.tensor([4, 1])}
    total, parts = total_loss(heads, logits, targets)
    assert set(parts) == {"verb", "noun"}
    assert parts["verb"] == pytest.approx(heads["verb"].loss(logits["verb"], targets["verb"]).item())
    assert total.item() == pytest.approx(parts["verb"] + parts["noun"], rel=1e-6)
    total.backward()
    assert heads["verb"].fc.weight.grad is not None and heads["noun"].fc.weight.grad is not None
    weighted, _ = total_loss(heads, logits, targets, weights={"noun": 2.0})
    assert weighted.item() == pytest.approx(parts["verb"] + 2 * parts["noun"], rel=1e-6)
    with pytest.raises(KeyError, match="no target for head 'noun'"):
        total_loss(heads, logits, {"verb": targets["verb"]})
    with pytest.raises(ValueError, match=r"head 'noun' \(linear\).*\(B, 5\)"):  # dict key names an unnamed head
        total_loss(heads, {"verb": logits["verb"], "noun": logits["verb"]}, targets)
