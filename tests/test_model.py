"""Whole models: factorize, collapse, target ratio, counts, normalisation pieces (docs/method.md)."""
import copy

import pytest
import torch
from torch import nn

import fnl


class SmallNet(nn.Module):
    def __init__(self, width=8, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.ReLU(),
                                   nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.grouped = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(2 * width, 32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.block(torch.relu(self.bn(self.stem(x))))
        return self.head(torch.relu(self.fc1(self.pool(self.grouped(x)).flatten(1))))


def test_factorize_selects_and_keeps_function_at_full_rank():
    torch.manual_seed(0)
    model = SmallNet().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y = model(x)
    fnl.factorize(model, rank_scale=1.0, spectral=True, exclude=["stem", "head"])
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["stem"] == "Conv2d" and kinds["head"] == "Linear" and kinds["grouped"] == "Conv2d"
    assert kinds["block.0"] == "FactorizedConv2d" and kinds["block.2"] == "FactorizedConv2d"
    assert kinds["fc1"] == "FactorizedLinear"
    assert torch.allclose(model(x), y, atol=1e-10), f"{(model(x) - y).abs().max():.3e}"


def test_factorize_include_patterns_and_predicate():
    model = fnl.factorize(SmallNet(), rank=2, include=["block.*"])
    assert [n for n, m in model.named_modules() if isinstance(m, fnl.FactorizedLayer)] == ["block.0", "block.2"]
    model = fnl.factorize(SmallNet(), rank=2, include=lambda name, m: isinstance(m, nn.Linear))
    assert [n for n, m in model.named_modules() if isinstance(m, fnl.FactorizedLayer)] == ["fc1", "head"]
    with pytest.raises(ValueError, match="selects no"):
        fnl.factorize(SmallNet(), rank=2, include=["nothing*"])
    with pytest.raises(TypeError, match="include must be"):
        fnl.factorize(SmallNet(), rank=2, include=[1, 2])
    with pytest.raises(ValueError, match="exactly one of rank, rank_scale or target_ratio"):
        fnl.factorize(SmallNet(), rank=2, rank_scale=0.5)
    with pytest.raises(ValueError, match="rank_scale must be a finite float > 0"):
        fnl.factorize(SmallNet(), rank_scale=0.0)


def test_factorize_non_spectral_keeps_bias_and_uses_init():
    torch.manual_seed(1)
    model = SmallNet()
    bias = model.fc1.bias.detach().clone()
    fnl.factorize(model, rank_scale=0.5, include=["fc1"], init=nn.init.zeros_)
    assert torch.equal(model.fc1.bias.detach(), bias)
    assert model.fc1.U.abs().sum() == 0 and model.fc1.V.abs().sum() == 0


def test_factorize_keeps_shared_layers_shared():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    fnl.factorize(model, rank=2)
    assert model[0] is model[2] and isinstance(model[0], fnl.FactorizedLinear)


def test_factorize_skips_multihead_attention_projections():
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "ff": nn.Linear(8, 8)})
    fnl.factorize(model, rank=2)
    assert type(model["attn"].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(model["ff"], fnl.FactorizedLinear)


def test_embeddings_opt_in():
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 3))
    fnl.factorize(model, rank=2)
    assert type(model[0]) is nn.Embedding and type(model[1]) is fnl.FactorizedLinear
    model = fnl.factorize(nn.Sequential(nn.Embedding(20, 8)), rank=2, embeddings=True)
    assert type(model[0]) is fnl.FactorizedEmbedding and model[0].rank == 2


@pytest.mark.parametrize("spectral", [False, True])
def test_factorize_validates_every_layer_before_swapping_any(spectral):
    """A later invalid layer (padding='same' with an even kernel) must leave the model exactly as it was."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 4, padding="same"),
                          nn.Flatten(), nn.Linear(8, 2))
    modules = [(n, m) for n, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot factorize layer '2' .*padding='same'.*the model is unchanged"):
        fnl.factorize(model, rank=2, spectral=spectral)
    assert [(n, id(m)) for n, m in model.named_modules()] == [(n, id(m)) for n, m in modules]
    assert not fnl.factorized_layers(model)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


@pytest.mark.parametrize("square", [False, True])
def test_collapse_keeps_outputs(square):
    torch.manual_seed(2)
    model = fnl.factorize(SmallNet(), rank_scale=0.4, square=square, exclude=["stem", "head"]).eval()
    with torch.no_grad():
        for layer in fnl.factorized_layers(model):
            if layer.S is not None:
                layer.S.add_(0.1 * torch.randn_like(layer.S))
    x = torch.randn(3, 3, 8, 8)
    y = model(x)
    fnl.collapse(model)
    assert not fnl.factorized_layers(model)
    y2 = model(x)
    assert torch.allclose(y, y2, atol=1e-5), f"max abs diff {(y - y2).abs().max():.3e}"


def test_count_parameters_dense_equivalent():
    dense = SmallNet()
    n_dense = fnl.count_parameters(dense)
    model = fnl.factorize(copy.deepcopy(dense), rank=2)
    assert fnl.count_parameters(model, dense=True) == n_dense
    assert fnl.count_parameters(model) < n_dense


def _candidate_bases(model, exclude):
    """rank_scale base of each layer factorize would pick (out*kh for convs, min(m, n) for linears)."""
    bases = []
    for name, m in model.named_modules():
        if name in exclude:
            continue
        if type(m) is nn.Conv2d and m.groups == 1:
            bases.append(m.out_channels * m.kernel_size[0])
        elif type(m) is nn.Linear:
            bases.append(min(m.in_features, m.out_features))
    return bases


def _reachable_ratios(model, square, exclude):
    """Every whole-model ratio one rank_scale in (0, 1] reaches, counted on factorized copies.

    Layer ranks ``round(scale * base)`` change only at scales ``(k + 1/2) / base``; one scale strictly
    between each pair of consecutive change points (and one each side) covers every step.
    """
    steps = sorted({(k + 0.5) / b for b in _candidate_bases(model, exclude) for k in range(b)} | {1.0})
    scales = [steps[0] / 2] + [(a + b) / 2 for a, b in zip(steps, steps[1:])] + [1.0]
    dense = fnl.count_parameters(model)
    return {s: fnl.count_parameters(fnl.factorize(copy.deepcopy(model), rank_scale=s, square=square,
                                                  exclude=exclude)) / dense for s in scales}


@pytest.mark.parametrize("square, target", [(False, 0.5), (False, 0.75), (False, 1.0), (True, 0.8), (True, 1.3)])
def test_target_ratio_is_the_closest_reachable(square, target):
    """No rank_scale on the step grid gets closer to the target (square layers: the r x r S counts)."""
    model = SmallNet(width=8)
    exclude = ["stem", "head"]
    scale = fnl.solve_rank_scale(model, target, exclude=exclude, square=square)
    got = fnl.count_parameters(fnl.factorize(copy.deepcopy(model), rank_scale=scale, square=square,
                                             exclude=exclude)) / fnl.count_parameters(model)
    reachable = _reachable_ratios(model, square, exclude)
    best = min(reachable.values(), key=lambda r: abs(r - target))
    assert abs(got - target) <= abs(best - target) + 1e-12, \
        f"ratio {got:.5f} for target {target}; {best:.5f} is reachable (scale {scale:.4f})"


def test_target_ratio_through_factorize_and_unreachable():
    model = SmallNet(width=16)
    dense = fnl.count_parameters(model)
    fnl.factorize(copy.deepcopy(model), target_ratio=0.6)
    with pytest.raises(ValueError, match=r"target_ratio=0.001 cannot be reached: this model's ratios run from"):
        fnl.factorize(model, target_ratio=0.001)
    with pytest.raises(ValueError, match="cannot be reached"):
        fnl.solve_rank_scale(model, 5.0)
    with pytest.raises(ValueError, match=r"target_ratio must be a finite float > 0, got nan"):
        fnl.solve_rank_scale(model, float("nan"))
    assert fnl.count_parameters(model) == dense, "a failed factorize must leave the model untouched"


def test_target_ratio_on_28_wide_layers_matches_closed_form():
    """28 convs 640 -> 640, 3x3 (WRN-28-10 sized; on the meta device, nothing allocated): each factorized
    layer has r (1920 + 1920) parameters against 640*640*9, so ratio 0.05 is exactly rank 48."""
    model = nn.Sequential(*[nn.Conv2d(640, 640, 3, padding=1, bias=False, device="meta") for _ in range(28)])
    scale = fnl.solve_rank_scale(model, 0.05)
    assert round(scale * 640 * 3) == 48, scale


def test_summary_and_macs():
    torch.manual_seed(3)
    model = fnl.factorize(SmallNet(), rank=2, include=["block.0", "fc1"])
    s = fnl.summary(model, (3, 8, 8))
    rows = {r.name: r for r in s.rows}
    assert rows["block.0"].rank == 2 and rows["block.0"].kind == "FactorizedConv2d"
    assert rows["block.0"].macs == model.block[0].macs((8, 8, 8))
    assert rows["stem"].macs == 8 * 3 * 9 * 64
    assert rows["grouped"].macs == 16 * 8 * 9 * 16  # groups=2 halves the input channels per output
    assert s.total_params == fnl.count_parameters(model)
    assert s.dense_params == fnl.count_parameters(SmallNet())
    assert fnl.count_macs(model, (3, 8, 8)) == s.total_macs == sum(r.macs for r in s.rows)
    assert fnl.count_macs(model, (3, 8, 8), dense=True) == fnl.count_macs(SmallNet(), (3, 8, 8))
    text = str(s)
    assert "FactorizedConv2d" in text and "total (whole model)" in text and f"{s.param_ratio:.4f}" in text
    model.train()
    fnl.summary(model, (3, 8, 8))
    assert model.training, "summary must restore the training mode"
    with pytest.raises(ValueError, match="count_macs needs input_size"):
        fnl.count_macs(model)


def test_frobnorm_record_and_normalize(tmp_path):
    torch.manual_seed(4)
    model = fnl.factorize(SmallNet(), rank=3, exclude=["stem", "head"])
    start = copy.deepcopy(model)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))

    def train(m, steps, after_step, coef):
        opt = fnl.FrobeniusDecay(torch.optim.SGD(m.parameters(), lr=0.1), m, coef)
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
            after_step()

    recorder = fnl.FrobeniusNormRecorder(model)
    train(model, 6, recorder.record, 0.1)
    path = tmp_path / "frobnorms.pt"
    resumed = fnl.FrobeniusNormRecorder(model)
    resumed.load_state_dict(recorder.state_dict())
    assert torch.equal(resumed.norms(3), recorder.norms(3))
    recorder.save(path, steps_per_epoch=3)
    norms = fnl.load_frobnorms(path)
    assert norms.shape == (2, 3, 3)
    normalizer = fnl.FrobeniusNormalizer(start, norms)
    seen = []
    train(start, 6, lambda: (normalizer.step(), seen.append(
        torch.stack([fnl.frobenius_norm(layer) for layer in fnl.factorized_layers(start)]).detach())), 0.0)
    assert torch.allclose(torch.stack(seen).view(2, 3, 3), norms, rtol=1e-5)
    with pytest.raises(IndexError, match="trajectory has 6 steps"):
        normalizer.step()
    with pytest.raises(ValueError, match="must be >= 1 and divide the 6 recorded steps"):
        recorder.norms(4)
    with pytest.raises(ValueError, match=r"norms must have shape \[epochs, steps, 3\]"):
        fnl.FrobeniusNormalizer(start, torch.ones(1, 2, 5))


def test_normalizer_handles_tensor_convs():
    torch.manual_seed(5)
    model = nn.Sequential(fnl.TTConv2d(8, 8, 3, padding=1, rank_scale=0.5),
                          fnl.FactorizedConv2d(8, 8, 3, padding=1, rank=4, square=True))
    targets = torch.tensor([[[0.5, 2.0]]])
    s_before = model[1].S.detach().clone()
    fnl.FrobeniusNormalizer(model, targets).step()
    norms = torch.stack([fnl.frobenius_norm(layer) for layer in fnl.factorized_layers(model)]).detach()
    assert torch.allclose(norms, targets[0, 0], rtol=1e-5), norms
    assert torch.equal(model[1].S.detach(), s_before), "the square factor is not rescaled"


def test_summary_says_why_each_dense_layer_is_dense():
    """fnl.summary's "why dense" column: the model's recorded reason first, else what factorize refuses."""
    torch.manual_seed(0)

    class Sub(nn.Linear):
        pass

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
                          nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), Sub(8, 8),
                          nn.Linear(8, 4))
    fnl.factorize(model, rank=2, exclude=["0", "8"])
    model.fnl_kept_dense = {"0": "stem (first layer)"}
    rows = {r.name: r for r in fnl.summary(model, (3, 8, 8)).rows}
    assert {n: r.why_dense for n, r in rows.items()} == {
        "0": "stem (first layer)",
        "1": "depthwise conv (groups=8): the factorized conv has one group",
        "2": "grouped conv (groups=2): the factorized conv has one group",
        "3": "padding_mode='reflect': the factorized conv pads with zeros",
        "4": None,
        "7": "Sub is a subclass of nn.Linear (exact types only)",
        "8": "not selected (include / exclude, or the model's rules)",
    }
    text = str(fnl.summary(model, (3, 8, 8)))
    assert text.splitlines()[0].endswith("why dense")
    line = next(x for x in text.splitlines() if x.startswith("1 "))
    assert line.endswith("depthwise conv (groups=8): the factorized conv has one group")
    mha = nn.Sequential(nn.MultiheadAttention(8, 2))
    assert fnl.summary(mha).rows[0].why_dense == "inside nn.MultiheadAttention (it reads the weight directly)"


def test_whole_model_functions_on_every_layer_kind():
    """collapse, count_parameters(dense=True) and summary treat U S Vᵀ layers and tensor convs alike."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), fnl.TTConv2d(8, 8, 3, padding=1, rank_scale=0.5),
                          fnl.TuckerConv2d(8, 8, 1, rank_scale=0.5), fnl.FactorizedConv2d(8, 8, 3, padding=1, rank=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), fnl.FactorizedLinear(8, 4, rank=2, square=True)).eval()
    x = torch.randn(2, 3, 6, 6)
    s = fnl.summary(model, (3, 6, 6))
    assert [r.rank for r in s.rows] == [None, (2, 2), (2, 2, 2), 2, 2]
    assert s.total_params == fnl.count_parameters(model)
    with torch.no_grad():
        before = model(x)
        dense_count = fnl.count_parameters(model, dense=True)
        fnl.collapse(model)
        after = model(x)
    assert not fnl.factorized_layers(model)
    assert [type(m) for m in model if isinstance(m, (nn.Conv2d, nn.Linear))] == [nn.Conv2d] * 4 + [nn.Linear]
    assert fnl.count_parameters(model) == dense_count == s.dense_params
    assert torch.allclose(before, after, atol=1e-5), f"{(before - after).abs().max()}"
