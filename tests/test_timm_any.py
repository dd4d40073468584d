"""``timm.create_model('fnl', base=...)``: any timm model factorized by the paper's rules (sections 2-3).

Driven by timm's registry over a representative set, each at a tiny width / input size that timm
allows (the architecture is the registered one: block types, depths, heads, stem and classifier).
"""
import argparse
import copy
import math

import pytest
import torch
from torch import nn

timm = pytest.importorskip('timm')
import fnl  # noqa: E402
import fnl_timm  # noqa: E402,F401  (registers 'fnl' and the fd* optimizers)
from timm.utils import ParseKwargs  # noqa: E402

# registered name -> (timm kwargs making it tiny, input side)
MODELS = {
    'resnet50': (dict(channels=(8, 16, 32, 64), stem_width=8), 32),
    'convnext_atto': (dict(dims=(8, 16, 32, 64)), 32),
    'efficientnet_b0': ({}, 32),  # its entrypoint fixes the width multiplier
    'vit_tiny_patch16_224': (dict(img_size=32, patch_size=8, depth=2), 32),
    'deit_tiny_patch16_224': (dict(img_size=32, depth=2), 32),
}
NAMES = sorted(MODELS)
CLASSES = 10


pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def _dense(name, seed=0, **extra):
    kwargs, _ = MODELS[name]
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=CLASSES, **kwargs, **extra)


def _fnl(name, seed=0, **extra):
    kwargs, _ = MODELS[name]
    torch.manual_seed(seed)
    return timm.create_model('fnl', base=name, num_classes=CLASSES, **kwargs, **extra)


def _x(name, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    side = MODELS[name][1]
    return torch.randn(batch, 3, side, side, generator=g)


def _kept_by_rule(model):
    """Stem and classifier names (pretrained_cfg) and grouped convs: the layers that stay dense."""
    cfg = model.pretrained_cfg
    heads = cfg['classifier'] if isinstance(cfg['classifier'], (tuple, list)) else (cfg['classifier'],)
    kept = {cfg['first_conv'], *heads}
    kept |= {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    return kept


def _closed_form_params(dense, rank_scale, square=False):
    """Parameters of the factorized model from the dense one: r (m + n) (+ r² with S) + bias for each
    factorized layer (the paper's rank rules), everything else as it is."""
    kept = _kept_by_rule(dense)
    total = 0
    for name, module in dense.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if type(module) not in (nn.Linear, nn.Conv2d) or name in kept:
            total += own
            continue
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            m, n, base = module.out_channels * kh, module.in_channels * kw, module.out_channels * kh
        else:
            m, n = module.out_features, module.in_features
            base = min(m, n)
        r = max(1, round(rank_scale * base))
        total += r * (m + n) + (r * r if square else 0) + (module.bias.numel() if module.bias is not None else 0)
    return total


def test_registry_names_exist():
    assert timm.is_model('fnl') and all(timm.is_model(n) for n in NAMES)
    assert 'fnl' not in timm.list_models('fnl_*')  # the zoo's listing is unchanged


@pytest.mark.parametrize('square', [False, True])
@pytest.mark.parametrize('name', NAMES)
def test_forward_backward_and_parameter_count(name, square):
    dense = _dense(name)
    model = _fnl(name, rank_scale=0.25, square=square)
    assert sum(p.numel() for p in model.parameters()) == _closed_form_params(dense, 0.25, square)
    assert model.rank_scale == 0.25
    factorized = {n for n, m in model.named_modules() if isinstance(m, fnl.FactorizedLayer)}
    assert factorized and not factorized & _kept_by_rule(dense)
    assert set(model.fnl_kept_dense) == _kept_by_rule(dense)
    out = model(_x(name))
    assert out.shape == (2, CLASSES)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize('name', NAMES)
def test_full_rank_spectral_reproduces_dense_and_collapses(name):
    """rank_scale 1 (every rank >= min(m, n)) with spectral init: the dense model's function; collapse
    gives back dense layers with the same outputs."""
    dense = _dense(name).eval()
    model = _fnl(name, rank_scale=1.0, spectral=True).eval()  # same seed: the same dense init
    x = _x(name)
    with torch.no_grad():
        ref, out = dense(x), model(x)
        assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), f'{(out - ref).abs().max()}'
        fnl.collapse(model)
        assert not any(isinstance(m, fnl.FactorizedLayer) for m in model.modules())
        assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in dense.parameters())
        back = model(x)
        assert torch.allclose(back, ref, atol=1e-4, rtol=1e-4), f'{(back - ref).abs().max()}'


@pytest.mark.parametrize('name', NAMES)
def test_fdmomentum_step_is_the_closed_form(name):
    """One fdmomentum step with a zero task gradient, no manual mark_factors: every factor moves by
    lr * wd * U (VᵀV) (resp. V (UᵀU)); other decayed parameters by plain weight decay; the
    parameters timm exempts (1-d, biases, no_weight_decay()) stay."""
    model = _fnl(name, rank_scale=0.25)
    lr, wd = 0.5, 0.1
    opt = timm.optim.create_optimizer_v2(model, 'fdmomentum', lr=lr, weight_decay=wd, momentum=0.9)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    skip = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()
    factors = {}
    for name_, layer in model.named_modules():
        if isinstance(layer, fnl.FactorizedLayer):
            u, v = before[f'{name_}.U'], before[f'{name_}.V']
            factors[f'{name_}.U'] = u - lr * wd * u @ (v.T @ v)
            factors[f'{name_}.V'] = v - lr * wd * v @ (u.T @ u)
    assert factors
    for n, p in model.named_parameters():
        if n in factors:
            expected = factors[n]
        elif p.ndim <= 1 or n.endswith('.bias') or n in skip:
            expected = before[n]
        else:
            expected = before[n] * (1 - lr * wd)
        assert torch.allclose(p, expected, atol=1e-6, rtol=1e-5), f'{n}: {(p - expected).abs().max()}'


@pytest.mark.parametrize('name', NAMES)
def test_state_dict_round_trip_through_timm_load_checkpoint(name, tmp_path):
    model = _fnl(name, rank_scale=0.25, seed=0).eval()
    path = tmp_path / 'ckpt.pth'
    torch.save(model.state_dict(), path)
    other = _fnl(name, rank_scale=0.25, seed=1).eval()
    x = _x(name)
    want = model.state_dict()
    assert not all(torch.equal(t, want[k]) for k, t in other.state_dict().items())
    timm.models.load_checkpoint(other, str(path), strict=True)
    assert all(torch.equal(t, want[k]) for k, t in other.state_dict().items())
    with torch.no_grad():
        assert torch.equal(other(x), model(x))


@pytest.mark.parametrize('name', NAMES)
def test_pretrained_file_is_loaded_then_factorized(name, tmp_path):
    """pretrained=True through timm's own loading (a local file): the dense weights are loaded first and
    then factorized by SVD, as fnl.factorize does to the loaded dense model."""
    trained = _dense(name, seed=3)
    path = tmp_path / 'dense.pth'
    torch.save(trained.state_dict(), path)
    model = _fnl(name, seed=4, rank_scale=0.25, pretrained=True,
                 pretrained_cfg_overlay=dict(file=str(path), num_classes=CLASSES)).eval()
    expected = fnl.factorize(trained, rank_scale=0.25, spectral=True, exclude=sorted(_kept_by_rule(trained))).eval()
    got, want = dict(model.named_modules()), dict(expected.named_modules())
    assert got.keys() == want.keys() and model.state_dict().keys() == expected.state_dict().keys()
    for k, layer in want.items():  # factors: the same product (the columns beyond min(m, n) are random)
        if isinstance(layer, fnl.FactorizedLayer):
            assert got[k].rank == layer.rank
            a, b = got[k].dense_weight(), layer.dense_weight()
            assert torch.allclose(a, b, atol=1e-6), f'{k}: {(a - b).abs().max()}'
    factors = {id(p) for m in model.modules() if isinstance(m, fnl.FactorizedLayer) for p in m.factor_parameters()}
    for (k, a), b in zip(model.named_parameters(), expected.parameters()):
        assert id(a) in factors or torch.equal(a, b), k
    x = _x(name)
    with torch.no_grad():
        a, b = model(x), expected(x)
        assert torch.allclose(a, b, atol=1e-5), f'{(a - b).abs().max()}'


def test_pretrained_with_other_in_chans(tmp_path):
    """timm adapts the pretrained stem to in_chans (summing over RGB for one channel) before the
    factorization; the factorized layers are the SVD of the loaded weights."""
    trained = _dense('resnet50', seed=7)
    path = tmp_path / 'dense.pth'
    torch.save(trained.state_dict(), path)
    model = _fnl('resnet50', pretrained=True, in_chans=1, rank_scale=1.0,
                 pretrained_cfg_overlay=dict(file=str(path), num_classes=CLASSES))
    assert torch.allclose(model.conv1.weight, trained.conv1.weight.sum(1, keepdim=True))
    w = model.layer1[0].conv2.dense_weight()
    assert torch.allclose(w, trained.layer1[0].conv2.weight, atol=1e-5), f'{(w - trained.layer1[0].conv2.weight).abs().max()}'


@pytest.mark.parametrize('name', NAMES)
def test_timm_interface_kept(name):
    """The base model's pretrained_cfg, forward_features / forward_head, reset_classifier,
    set_grad_checkpointing and features_only."""
    dense = _dense(name)
    model = _fnl(name, rank_scale=0.25).eval()
    for key in ('mean', 'std', 'input_size', 'first_conv', 'classifier'):
        assert model.pretrained_cfg[key] == dense.pretrained_cfg[key]
        assert model.default_cfg[key] == dense.default_cfg[key]
    x = _x(name)
    with torch.no_grad():
        assert torch.allclose(model.forward_head(model.forward_features(x)), model(x))
        model.reset_classifier(5)
        assert model(x).shape == (2, 5)
        assert type(model.get_classifier()) is nn.Linear  # a new classifier is dense
    model.set_grad_checkpointing(True)
    model.train()
    model(x).sum().backward()
    depth = MODELS[name][0].get('depth')
    which = dict(out_indices=tuple(range(depth))) if depth else {}
    feats = _fnl(name, rank_scale=0.25, features_only=True, **which).eval()
    ref = _dense(name, features_only=True, **which).eval()
    assert any(isinstance(m, fnl.FactorizedLayer) for m in feats.modules())
    stem = [n for n in feats.fnl_kept_dense if n.endswith(dense.pretrained_cfg['first_conv'].replace('.', '_'))
            or n.endswith(dense.pretrained_cfg['first_conv'])]
    assert len(stem) == 1 and not isinstance(feats.get_submodule(stem[0]), fnl.FactorizedLayer)
    with torch.no_grad():
        assert [f.shape for f in feats(x)] == [f.shape for f in ref(x)]


def test_kept_dense_says_why():
    model = _fnl('convnext_atto', rank_scale=0.25, exclude='stages.3.*')
    why = model.fnl_kept_dense
    assert why['stem.0'].startswith('stem') and why['head.fc'].startswith('classifier')
    assert why['stages.0.blocks.0.conv_dw'] == 'depthwise conv (groups=8): the factorized conv has one group'
    assert why['stages.3.blocks.0.mlp.fc1'] == 'named by exclude'
    assert isinstance(model.get_submodule('stages.2.blocks.0.mlp.fc1'), fnl.FactorizedLayer)
    both = _fnl('convnext_atto', rank_scale=0.25, factorize_stem=True, factorize_classifier=True)
    assert isinstance(both.get_submodule('stem.0'), fnl.FactorizedLayer)
    assert isinstance(both.get_submodule('head.fc'), fnl.FactorizedLayer)


def test_target_ratio_and_rank():
    dense = _dense('resnet50')
    model = _fnl('resnet50', target_ratio=0.3)
    ratio = sum(p.numel() for p in model.parameters()) / sum(p.numel() for p in dense.parameters())
    assert abs(ratio - 0.3) < 0.02 and 0 < model.rank_scale < 1
    assert sum(p.numel() for p in model.parameters()) == _closed_form_params(dense, model.rank_scale)
    ranked = _fnl('resnet50', rank=3)
    ranks = {m.rank for m in ranked.modules() if isinstance(m, fnl.FactorizedLayer)}
    assert ranks == {3} and not hasattr(ranked, 'rank_scale')
    plain = _fnl('resnet50')  # no rank argument: the dense base model
    assert not any(isinstance(m, fnl.FactorizedLayer) for m in plain.modules()) and plain.rank_scale == 0.0


def test_command_line_kwargs():
    """timm's --model-kwargs parsing (stock train.py, fnl-train): strings, numbers, tuples and a
    comma-separated exclude."""
    p = argparse.ArgumentParser()
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    kw = p.parse_args(['--model-kwargs', 'base=resnet50', 'rank_scale=0.25', 'spectral=True',
                       'exclude=layer4.*,layer3.0.downsample.0', 'channels=(8,16,32,64)', 'stem_width=8']).model_kwargs
    assert kw['exclude'] == 'layer4.*,layer3.0.downsample.0' and kw['base'] == 'resnet50'
    model = timm.create_model('fnl', num_classes=CLASSES, **kw)
    assert model.fnl_kept_dense['layer4.0.conv2'] == 'named by exclude'
    assert model.fnl_kept_dense['layer3.0.downsample.0'] == 'named by exclude'
    assert isinstance(model.get_submodule('layer3.0.conv2'), fnl.FactorizedLayer)


def test_fnl_train_runs_it(tmp_path):
    from fnl_timm import train as fnl_train
    res = fnl_train.run(['--model', 'fnl', '--model-kwargs', 'base=resnet50', 'channels=(8,16,32,64)', 'stem_width=8',
                         '--rank-scale', '0.25', '--spectral', '--wd2fd', '--img-size', '16', '--batch-size', '32',
                         '--workers', '0', '--epochs', '1', '--limit-train-batches', '2', '--limit-val-batches', '1',
                         '--no-progress', '--no-tensorboard', '--output', str(tmp_path), '--experiment', 'any'])
    assert res['params'] == _closed_form_params(_dense('resnet50'), 0.25)
    assert res['params'] < res['dense_params'] and res['rank_scale'] == 0.25 and math.isfinite(res['eval_loss'])
    assert res['factorized_layers'] == sum(isinstance(m, fnl.FactorizedLayer) for m in _fnl('resnet50', rank_scale=0.25).modules())


@pytest.mark.parametrize('kwargs, match', [
    (dict(base='not_a_model'), "base 'not_a_model' is not a timm model"),
    (dict(), 'base must be the name of a timm model'),
    (dict(base='fnl'), "not 'fnl' itself"),
    (dict(base='resnet50', rank_scale=-1.0), 'rank_scale must be a finite float > 0'),  # docs/method.md#rank-settings
    (dict(base='resnet50', rank_scale='a'), 'rank_scale must be'),
    (dict(base='resnet50', rank=0), 'rank must be an int >= 1'),
    (dict(base='resnet50', target_ratio=0.0), 'target_ratio must be a finite float > 0'),
    (dict(base='resnet50', rank=4, rank_scale=0.5), 'at most one of rank, rank_scale or target_ratio'),
    (dict(base='resnet50', spectral=True), 'spectral / square need a factorized model'),
    (dict(base='resnet50', rank_scale=0.5, spectral='yes'), 'spectral must be True or False'),
    (dict(base='resnet50', rank_scale=0.5, exclude='layer9.*'), "exclude pattern 'layer9.\\*' matches no"),
    (dict(base='resnet50', rank_scale=0.5, exclude=3), 'exclude must be an fnmatch pattern'),
    (dict(base='resnet50', rank_scale=0.5, exclude='layer*'), 'has nothing to factorize'),
    (dict(base='resnet50', rank_scale=0.5, pretrained=True, spectral=False), 'spectral=False with pretrained=True'),
])
def test_bad_input_names_the_argument(kwargs, match):
    extra = MODELS['resnet50'][0] if kwargs.get('base') == 'resnet50' else {}
    with pytest.raises((ValueError, TypeError), match=match):  # TypeError: a value of the wrong type
        timm.create_model('fnl', **kwargs, **extra)


# --- ViT / DeiT attention: heads shrunk by rank_scale, query-key / output-value forms (paper section 3.2) ---
VITS = ['deit_tiny_patch16_224', 'vit_tiny_patch16_224']


def _head_forms(attn):
    """Per head: (scale * W_Q^hᵀ W_K^h, W_O^h W_V^h), each (heads, d, d), in float64."""
    w, width, heads, dh = attn.qkv.weight.double(), attn.attn_dim, attn.num_heads, attn.head_dim
    q, k, v = (w[i * width:(i + 1) * width].reshape(heads, dh, -1) for i in range(3))
    o = attn.proj.weight.double().T.reshape(heads, dh, -1)
    return attn.scale * q.transpose(1, 2) @ k, o.transpose(1, 2) @ v


def _truncated(forms, rank):
    u, s, vh = torch.linalg.svd(forms)
    return u[..., :rank] @ torch.diag_embed(s[..., :rank]) @ vh[..., :rank, :]


@pytest.mark.parametrize('qkv_bias', [True, False])
@pytest.mark.parametrize('name', VITS)
def test_heads_full_rank_spectral_reproduces_dense(name, qkv_bias):
    dense = _dense(name, qkv_bias=qkv_bias).eval()
    model = _fnl(name, qkv_bias=qkv_bias, rank_scale=1.0, spectral=True, attention='heads').eval()
    assert isinstance(model.blocks[0].mlp.fc1, fnl.FactorizedLayer) and type(model.blocks[0].attn.qkv) is nn.Linear
    x = _x(name)
    with torch.no_grad():
        a, b = model(x), dense(x)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), f'{(a - b).abs().max()}'


def test_heads_from_a_pretrained_file(tmp_path):
    """pretrained=True with attention='heads': the loaded dense weights are what the heads are cut from
    (at rank_scale 1 the loaded model's function)."""
    name = 'deit_tiny_patch16_224'
    trained = _dense(name, seed=5, qkv_bias=True).eval()
    path = tmp_path / 'dense.pth'
    torch.save(trained.state_dict(), path)
    model = _fnl(name, seed=6, qkv_bias=True, pretrained=True, rank_scale=1.0, attention='heads',
                 pretrained_cfg_overlay=dict(file=str(path), num_classes=CLASSES)).eval()
    x = _x(name)
    with torch.no_grad():
        a, b = model(x), trained(x)
    assert torch.allclose(a, b, atol=1e-4), f'{(a - b).abs().max()}'


@pytest.mark.parametrize('name', VITS)
def test_heads_shrunk_to_best_rank_forms(name):
    """rank_scale 0.5: d_h = int(0.5 * d / heads); each head's scaled query-key form and output-value
    form are the best rank-d_h approximations of the dense ones, in balanced factors; the parameter
    count is the closed form."""
    dense = _dense(name)
    model = _fnl(name, rank_scale=0.5, spectral=True, attention='heads')
    d, heads = dense.embed_dim, dense.blocks[0].attn.num_heads
    dh = int(0.5 * d / heads)
    def low_rank(lin):  # what attention='linear' would give qkv / proj
        r = max(1, round(0.5 * min(lin.in_features, lin.out_features)))
        return r * (lin.in_features + lin.out_features) + (lin.bias.numel() if lin.bias is not None else 0)

    shrunk = d * 3 * heads * dh + 3 * heads * dh * (dense.blocks[0].attn.qkv.bias is not None) + heads * dh * d + d
    expected = _closed_form_params(dense, 0.5) + sum(
        shrunk - low_rank(b.attn.qkv) - low_rank(b.attn.proj) for b in dense.blocks)
    assert sum(p.numel() for p in model.parameters()) == expected
    for blk_dense, blk in zip(dense.blocks, model.blocks):
        attn = blk.attn
        assert attn.head_dim == dh and attn.qkv.out_features == 3 * heads * dh and attn.scale == dh ** -0.5
        (qk0, ov0), (qk1, ov1) = _head_forms(blk_dense.attn), _head_forms(attn)
        assert torch.allclose(qk1, _truncated(qk0, dh), atol=1e-5), f'{(qk1 - _truncated(qk0, dh)).abs().max()}'
        assert torch.allclose(ov1, _truncated(ov0, dh), atol=1e-5), f'{(ov1 - _truncated(ov0, dh)).abs().max()}'
        width = attn.attn_dim
        w = attn.qkv.weight.detach().double()
        sq = torch.linalg.svdvals(w[:width].reshape(heads, dh, -1))
        sk = torch.linalg.svdvals(w[width:2 * width].reshape(heads, dh, -1))
        assert torch.allclose(sq, sk, rtol=1e-4, atol=1e-7)  # balanced


@pytest.mark.parametrize('qkv_bias', [True, False])
def test_spectral_quekey_outval_keep_outputs_and_balance(qkv_bias):
    name = 'vit_tiny_patch16_224'
    dense = _dense(name, qkv_bias=qkv_bias).eval()
    model = _fnl(name, qkv_bias=qkv_bias, spectral_quekey=True, spectral_outval=True).eval()
    x = _x(name)
    with torch.no_grad():
        a, b = model(x), dense(x)
    assert torch.allclose(a, b, atol=1e-5), f'{(a - b).abs().max()}'
    attn, heads = model.blocks[0].attn, model.blocks[0].attn.num_heads
    width, dh = attn.attn_dim, attn.head_dim
    w = attn.qkv.weight.detach().double()
    sq, sk, sv = (torch.linalg.svdvals(w[i * width:(i + 1) * width].reshape(heads, dh, -1)) for i in range(3))
    so = torch.linalg.svdvals(attn.proj.weight.detach().double().T.reshape(heads, dh, -1))
    assert torch.allclose(sq, sk, rtol=1e-4) and torch.allclose(so, sv, rtol=1e-4)
    assert not torch.allclose(sq, torch.linalg.svdvals(
        dense.blocks[0].attn.qkv.weight.detach().double()[:width].reshape(heads, dh, -1)), rtol=1e-2)


def test_attention_fd_grad_on_fused_slices_equals_autograd():
    from fnl_timm.models import add_attention_fd_grad_, attention_owner
    model = _fnl('vit_tiny_patch16_224', qkv_bias=True, rank_scale=0.5, attention='heads')
    attn = model.blocks[1].attn
    assert attention_owner(attn.qkv.weight) is attn and attention_owner(attn.proj.weight) is attn
    w, width, heads, coef = attn.qkv.weight, attn.attn_dim, attn.num_heads, 0.3
    for quekey, outval in ((True, False), (False, True), (True, True)):
        penalty = 0.0
        if quekey:
            penalty = penalty + fnl.quekey_norm_sq(w[:width], w[width:2 * width], heads).sum()
        if outval:
            penalty = penalty + fnl.outval_norm_sq(attn.proj.weight, w[2 * width:], heads).sum()
        w.grad, attn.proj.weight.grad = torch.zeros_like(w), torch.zeros_like(attn.proj.weight)
        (0.5 * coef * penalty).backward()
        want_qkv, want_proj = w.grad.clone(), attn.proj.weight.grad.clone()
        base = torch.randn_like(w), torch.randn_like(attn.proj.weight)
        w.grad, attn.proj.weight.grad = base[0].clone(), base[1].clone()
        add_attention_fd_grad_(attn, coef, quekey, outval)
        assert torch.allclose(w.grad - base[0], want_qkv, atol=1e-6), f'{(w.grad - base[0] - want_qkv).abs().max()}'
        assert torch.allclose(attn.proj.weight.grad - base[1], want_proj, atol=1e-6)


@pytest.mark.parametrize('kwargs, match', [
    (dict(base='resnet50', rank_scale=0.5, attention='heads'), "attention='heads': ResNet has no timm Attention"),
    (dict(base='resnet50', spectral_quekey=True), 'spectral_quekey: ResNet has no timm Attention'),
    (dict(base='vit_tiny_patch16_224', rank=4, attention='heads'), "attention='heads' shrinks each head by rank_scale"),
    (dict(base='vit_tiny_patch16_224', rank_scale=0.5, attention='rows'), "attention must be 'linear' or 'heads'"),
    (dict(base='vit_tiny_patch16_224', rank_scale=0.5, spectral_outval=True), "with attention='linear' they are"),
    (dict(base='vit_tiny_patch16_224', rank_scale=0.5, attention='heads', qk_norm=True),
     'query-key form of .* is not a product of two matrices'),
    (dict(base='vit_tiny_patch16_224', spectral_quekey=True, qk_norm=True), 'query-key form .* not a product'),
    (dict(base='vit_tiny_patch16_224', rank_scale=0.001, attention='heads'), 'head dimension of 0'),
])
def test_attention_refusals(kwargs, match):
    extra = MODELS[kwargs['base']][0]
    with pytest.raises(ValueError, match=match):
        timm.create_model('fnl', **kwargs, **extra)


def test_recipe_smoke(tmp_path):
    """recipes/timm_any.py runs for real (--smoke --small, the ViT): dense, low rank + wd, spectral + FD."""
    import importlib.util
    import os
    import sys
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'recipes')
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location('timm_any_recipe', os.path.join(folder, 'timm_any.py'))
        recipe = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(recipe)
        rows = recipe.main(['--smoke', '--small', '--models', 'vit', '--output', str(tmp_path)])
    finally:
        sys.path.remove(folder)
    assert [r['run'] for r in rows] == ['vit-dense', 'vit-lowrank-wd', 'vit-lowrank-spectral-fd']
    assert rows[0]['compression_ratio'] == 1.0 and rows[1]['params'] == rows[2]['params'] < rows[0]['params']
    assert rows[2]['params_vs_dense_run'] == rows[2]['params'] / rows[0]['params']
    assert rows[2]['spectral'] and rows[2]['wd2fd'] and all(len(r['curve']) == 1 for r in rows)
    assert (tmp_path / 'timm_any.png').stat().st_size > 0 and (tmp_path / 'timm_any.json').exists()


def test_bench_smoke():
    """bench/bench_timm_any.py runs (tiny widths): images/s of both models, the MAC ratio of fnl.count_macs."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench', 'bench_timm_any.py')
    spec = importlib.util.spec_from_file_location('bench_timm_any', path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (row,) = bench.main(['--smoke', '--repeats', '1', '--models', 'vit_small_patch16_224', '--batch-size', '2'])
    kwargs = bench.MODELS['vit_small_patch16_224'][2]
    dense = timm.create_model('vit_small_patch16_224', **kwargs)
    fact = timm.create_model('fnl', base='vit_small_patch16_224', rank_scale=0.25, attention='heads', **kwargs)
    assert row['mac_speedup'] == fnl.count_macs(dense, (3, 32, 32)) / fnl.count_macs(fact, (3, 32, 32))
    assert all(row[k] > 0 for k in ('infer_img_s_dense', 'infer_img_s_fnl', 'train_img_s_dense', 'train_img_s_fnl'))
    (row,) = bench.main(['--smoke', '--repeats', '1', '--models', 'resnet50', '--batch-size', '2', '--channels-last'])
    for mode in ('infer', 'train'):  # four variants in one run, each against the dense model in NCHW
        assert row[f'{mode}_speedup_dense_cl'] > 0 and row[f'{mode}_speedup_fnl_cl'] > 0
        assert row[f'{mode}_speedup'] == pytest.approx(row[f'{mode}_img_s_fnl'] / row[f'{mode}_img_s_dense'])
