"""Whole models: factorize, collapse, target ratio, counts, normalisation pieces (SPEC 1, 4, 5)."""
import copy
import time

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
    assert type(model[0]) is nn.Embedding
    fnl.factorize(nn.Sequential(nn.Embedding(20, 8)), rank=2, embeddings=True)


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


@pytest.mark.parametrize("target", [0.5, 0.75, 1.0])
def test_target_ratio_within_one_rank_step(target):
    model = SmallNet(width=16)
    dense_params = fnl.count_parameters(model)
    scale = fnl.solve_rank_scale(model, target, exclude=["stem", "head"])
    fnl.factorize(model, rank_scale=scale, exclude=["stem", "head"])
    ratio = fnl.count_parameters(model) / dense_params
    # one rank step of the largest factorized layer bounds the achievable error
    step = max(sum(p.shape[0] for p in (layer.U, layer.V)) for layer in fnl.factorized_layers(model)) / dense_params
    assert abs(ratio - target) <= step, f"ratio {ratio:.4f} vs target {target} (step {step:.4f})"


def test_target_ratio_through_factorize_and_unreachable():
    model = SmallNet(width=16)
    dense = fnl.count_parameters(model)
    fnl.factorize(copy.deepcopy(model), target_ratio=0.6)
    with pytest.raises(ValueError, match=r"target_ratio=0.001 cannot be reached: this model's ratios run from"):
        fnl.factorize(model, target_ratio=0.001)
    with pytest.raises(ValueError, match="cannot be reached"):
        fnl.solve_rank_scale(model, 5.0)
    with pytest.raises(TypeError, match="target_ratio must be a finite float"):
        fnl.solve_rank_scale(model, float("nan"))
    assert fnl.count_parameters(model) == dense, "a failed factorize must leave the model untouched"


def test_target_ratio_solve_is_fast_on_28_layers():
    model = nn.Sequential(*[nn.Conv2d(640, 640, 3, padding=1, bias=False) for _ in range(28)])
    start = time.perf_counter()
    scale = fnl.solve_rank_scale(model, 0.05)
    elapsed = time.perf_counter() - start
    assert 0 < scale < 1
    assert elapsed < 1.0, f"solve took {elapsed:.3f}s"  # generous bound here; the benchmark reports the real time


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
