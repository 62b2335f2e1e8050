"""Pure pruning functions: schedules, masks, statistics, slimming, permanence."""

import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from lightning_quantum.models import DigitsCNN
from lightning_quantum.pruning import (
    SparsitySchedule,
    apply_masks,
    coupled_channel_masks,
    make_pruning_permanent,
    nm_masks,
    rebuild_architecture,
    record_architecture,
    select_parameters,
    slim_model,
    sparsity_report,
    structured_masks,
    unstructured_masks,
)
from lightning_quantum.pruning.slimming import build_dependency_graph, output_layers


# -- schedules --------------------------------------------------------------------------------
def test_cubic_schedule_matches_zhu_gupta_by_hand():
    s = SparsitySchedule("cubic", final_sparsity=0.8, initial_sparsity=0.2, start=100, end=500, frequency=100)
    # s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3 with t0=100, n dt=400
    assert s.sparsity_at(99) == 0.0
    assert s.sparsity_at(100) == pytest.approx(0.2)
    assert s.sparsity_at(200) == pytest.approx(0.8 + (0.2 - 0.8) * (1 - 100 / 400) ** 3)
    assert s.sparsity_at(250) == s.sparsity_at(200)  # held between updates
    assert s.sparsity_at(500) == s.sparsity_at(10_000) == pytest.approx(0.8)
    assert [t for t in range(0, 600) if s.is_update_step(t)] == [100, 200, 300, 400, 500]
    assert s.num_updates == 5


def test_linear_constant_and_one_shot():
    lin = SparsitySchedule("linear", 0.5, start=0, end=10, frequency=1)
    assert [lin.sparsity_at(t) for t in (0, 5, 10)] == [0.0, 0.25, 0.5]
    const = SparsitySchedule("constant", 0.5, initial_sparsity=0.3, start=2, end=6, frequency=2)
    assert [const.sparsity_at(t) for t in (1, 2, 5, 6)] == [0.0, 0.3, 0.3, 0.5]
    one = SparsitySchedule("one_shot", 0.9, start=7, end=7)
    assert (one.sparsity_at(6), one.sparsity_at(7), one.is_update_step(8)) == (0.0, 0.9, False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "exp", "final_sparsity": 0.5}, r"`schedule`='exp' is not valid. Choose one of: 'one_shot'"),
        ({"kind": "cubic", "final_sparsity": 1.0}, r"`final_sparsity`=1.0 is not valid. It must lie in \[0, 1\)"),
        ({"kind": "cubic", "final_sparsity": -0.1}, r"`final_sparsity`=-0.1 is not valid"),
        ({"kind": "cubic", "final_sparsity": 0.5, "start": 10, "end": 5}, r"`end_step`=5 is before `start_step`=10"),
        ({"kind": "cubic", "final_sparsity": 0.5, "frequency": 0}, r"`frequency`=0 is not valid"),
        ({"kind": "cubic", "final_sparsity": 0.2, "initial_sparsity": 0.5}, r"`initial_sparsity`=0.5 is above"),
    ],
)
def test_schedule_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsitySchedule(**kwargs)


# -- masks ------------------------------------------------------------------------------------
def test_global_unstructured_removes_exactly_the_smallest():
    w = {"a": torch.tensor([[1.0, -5.0], [0.5, 2.0]]), "b": torch.tensor([[3.0, -0.1, 4.0]])}
    masks = unstructured_masks(w, 3 / 7)
    assert masks["a"].tolist() == [[False, True], [False, True]]  # 1.0 and 0.5 go, with b's -0.1
    assert masks["b"].tolist() == [[True, False, True]]
    assert sum(int((~m).sum()) for m in masks.values()) == 3


def test_layer_scope_prunes_each_layer_to_the_target():
    torch.manual_seed(0)
    w = {"a": torch.randn(10, 10), "b": torch.randn(4, 5) * 100}
    masks = unstructured_masks(w, 0.5, scope="layer")
    assert int((~masks["a"]).sum()) == 50 and int((~masks["b"]).sum()) == 10


def test_masks_only_grow():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    first = unstructured_masks({"w": w}, 0.25)
    grown = torch.tensor([[100.0, 0.5, 3.0, 4.0]])  # the pruned weight came back large: it stays pruned
    second = unstructured_masks({"w": grown}, 0.5, previous=first)
    assert second["w"].tolist() == [[False, False, True, True]]


def test_structured_masks_drop_whole_rows_by_norm():
    w = torch.tensor([[1.0, 1.0], [0.1, 0.1], [5.0, 0.0], [0.0, 0.3]])
    l1 = structured_masks({"w": w}, 0.5, norm=1)["w"]
    assert l1.tolist() == [[True, True], [False, False], [True, True], [False, False]]
    # L2 ranks [0, 0.3] (0.3) above [0.1, 0.1] (0.141) but L1 ranks them the other way round
    w2 = torch.tensor([[0.1, 0.1], [0.0, 0.3]])
    assert structured_masks({"w": w2}, 0.5, norm=1)["w"][:, 0].tolist() == [False, True]
    assert structured_masks({"w": w2}, 0.5, norm=2)["w"][:, 0].tolist() == [False, True]
    w3 = torch.tensor([[0.15, 0.15], [0.0, 0.25]])  # L1: 0.30 vs 0.25; L2: 0.212 vs 0.25
    assert structured_masks({"w": w3}, 0.5, norm=1)["w"][:, 0].tolist() == [True, False]
    assert structured_masks({"w": w3}, 0.5, norm=2)["w"][:, 0].tolist() == [False, True]


def test_two_four_keeps_two_of_every_four():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    mask = nm_masks({"w": w})["w"]
    assert (mask.view(8, 4, 4).sum(-1) == 2).all()
    kept = (w.abs() * mask).view(8, 4, 4)
    dropped = (w.abs() * ~mask).view(8, 4, 4)
    assert (kept.max(-1).values >= dropped.max(-1).values).all()


@pytest.mark.parametrize(("n", "m"), [(4, 4), (5, 4), (0, 4)])
def test_nm_needs_n_below_m(n, m):
    with pytest.raises(ValueError, match=rf"`nm`={n}:{m} is not valid. It needs 0 < N < M"):
        nm_masks({"w": torch.randn(4, 8)}, n, m)


def test_nm_layer_not_divisible():
    with pytest.raises(ValueError, match=r"cannot split layer 'w': its 6 inputs per output are not a multiple of 4"):
        nm_masks({"w": torch.randn(4, 6)})


def test_select_parameters_and_its_errors():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert list(select_parameters(net)) == ["0", "2"]
    assert list(select_parameters(net, ignore=["2"])) == ["0"]
    assert list(select_parameters(net, names=["2"])) == ["2"]
    with pytest.raises(ValueError, match=r"`ignore` pattern 'head\*' matches no module of Sequential. Module names"):
        select_parameters(net, ignore=["head*"])
    with pytest.raises(ValueError, match=r"Nothing to prune in Sequential: no module of `module_types`=\['Conv2d'\]"):
        select_parameters(net, module_types=["Conv2d"])


def test_apply_masks_and_sparsity_report_by_hand():
    net = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 5))
    masks = unstructured_masks({"0.weight": net[0].weight, "1.weight": net[1].weight}, 0.6, scope="layer")
    apply_masks([net[0].weight, net[1].weight], [masks["0.weight"], masks["1.weight"]])
    rows = sparsity_report(net)
    assert rows[0] == {"layer": "0", "shape": "10x10", "params": 100, "zeros": 60, "sparsity": 0.6}
    assert rows[1]["zeros"] == 30
    assert rows[-1] == {"layer": "(global)", "shape": "", "params": 150, "zeros": 90, "sparsity": 0.6}


def test_make_permanent_removes_torch_prune_reparametrization():
    net = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2))
    torch_prune.l1_unstructured(net[0], "weight", amount=0.5)  # what Lightning's ModelPruning leaves behind
    assert "0.weight_orig" in net.state_dict()
    state = make_pruning_permanent(net)
    assert not any(k.endswith(("_orig", "_mask")) for k in state)
    fresh = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2))
    fresh.load_state_dict(state)
    assert int((fresh[0].weight == 0).sum()) == 18


# -- structured slimming ----------------------------------------------------------------------
def _cnn_with_random_bn():
    torch.manual_seed(0)
    model = DigitsCNN()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
            module.bias.data.normal_()
    return model.eval()


def test_masked_model_equals_slimmed_model_and_reloads():
    model = _cnn_with_random_bn()
    x = torch.randn(16, 1, 8, 8)
    graph = build_dependency_graph(model, x[:1])
    targets = {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    targets["classifier.1.weight"] = model.classifier[1].weight
    assert output_layers(model, graph, [t.rsplit(".", 1)[0] for t in targets]) == []
    assert output_layers(model, graph, ["classifier.4"]) == ["classifier.4"]
    channels = structured_masks(targets, 0.5)
    full = coupled_channel_masks(model, graph, channels)
    assert {"features.0.bn.weight", "features.0.bn.bias", "classifier.1.bias"} <= set(full)
    params = dict(model.named_parameters())
    apply_masks([params[k] for k in full], [full[k] for k in full])
    masked_out = model(x)
    before = sum(p.numel() for p in model.parameters())
    removed = slim_model(model, graph, channels)
    assert removed == {"features.0.conv": 16, "features.1.conv": 32, "features.3.conv": 32, "classifier.1": 64}
    after = sum(p.numel() for p in model.parameters())
    assert after < 0.35 * before
    torch.testing.assert_close(model(x), masked_out, atol=1e-5, rtol=1e-5)
    record = record_architecture(model)
    pickle.dumps(record)  # plain data
    fresh = rebuild_architecture(DigitsCNN(), record)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval()(x), model(x))


def test_a_forged_architecture_record_is_refused_before_anything_changes():
    """A record read from a checkpoint may ask for huge tensors or set arbitrary attributes: both refused."""
    import copy

    model = DigitsCNN()
    state = model.state_dict()
    honest = record_architecture(model)
    before = copy.deepcopy(model.state_dict())
    huge = copy.deepcopy(honest)
    huge["classifier.1"]["tensors"]["weight"] = [1 << 20, 1 << 20]  # 4 TB of float32
    forward = copy.deepcopy(honest)
    forward["classifier.1"]["attrs"]["forward"] = 1
    stranger = copy.deepcopy(honest)
    stranger["classifier.1"]["tensors"]["extra"] = [1]
    cases = [
        (huge, r"classifier.1.weight=\[1048576, 1048576\] must be sizes no larger than the model's \[128, 1024\]"),
        (forward, r"sets attribute 'forward'; only size attributes are restored"),
        (stranger, r"'classifier.1' has no parameter or buffer 'extra'"),
        ({"classifier.1": "x"}, r"the entry of 'classifier.1' is not a mapping"),
    ]
    for record, match in cases:
        with pytest.raises(ValueError, match=match):
            rebuild_architecture(model, record)
    # smaller than the model, but not what the weights hold: refused when the weights are given
    smaller = copy.deepcopy(honest)
    smaller["classifier.1"]["tensors"]["weight"] = [64, 1024]
    with pytest.raises(ValueError, match=r"classifier.1.weight is recorded as \[64, 1024\], but the weights hold"):
        rebuild_architecture(model, smaller, state)
    assert model.forward.__func__ is DigitsCNN.forward
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing changed
