"""The CPU speed paths of factorized models, each measured side by side with its alternatives in one run.

Parts (``--only``, default all), timed with ``fnl.measure_latency`` (interleaved rounds, medians):

- ``model``: ``fnl_resnet20`` @0.111 against the dense model, inference (batch 256) and a training step
  (batch 128, momentum SGD): the contiguous (NCHW) and the channels-last memory format (fnl-train's
  default for factorized convs on the CPU), and channels-last inputs to a contiguous model; in
  inference also without the zoo's BatchNorm folding (``set_bn_folding(False)``).
- ``stage1``: the rank-5 first stage (a 1x3 conv 16 -> 5 and a 3x1 conv 5 -> 16 on 32x32 maps), alone
  and inside the model, in NCHW: the pair run channels-last inside the layer (output converted back),
  ``path='dense'``, against the plain NCHW pair and the channels-last model.
- ``compile``: ``fnl.compile_for_inference`` (inference form, BatchNorm folded, channels-last weights,
  ``torch.compile``) against the eager variants, inference at batch 256.
- ``compile_train``: a training step (batch 128, channels-last) with ``torch.compile`` of the model
  and of the whole step (forward, backward and the optimizer step in one compiled function),
  against the eager steps; the compiled steps' first losses are checked against eager.
- ``pad``: the rank channels zero-padded to a multiple of 8 in eager inference (``cpu_inference_rank_align
  = 8``, the default on a channels-last input on an AVX2 CPU; forced for NCHW): each ResNet-20 stage's conv
  pair alone against the dense 3x3 conv (channels-last, batch 256, with the multiply-add rate), and
  the zoo models, bare rank (``cpu_inference_rank_align = 0``) against padded (the same numbers).
- ``convs``: each ResNet-20 stage's two convs timed one by one (the 1x3 conv in -> r and the 3x1 conv
  r -> out, channels-last, inference, batch 256) at the bare rank, padded to a multiple of 8 and at 16,
  next to the dense 3x3 conv, with the multiply-add rate: which of the two convs takes the time.
- ``train_pair``: the training step (batch 128, channels-last) of ``fnl_resnet20`` against the two plain
  convs, in several blocks of interleaved rounds, each block's ratio printed beside an A/A control (a
  second copy of the factorized model): how far apart the two are against the run-to-run spread.
- ``linear``: ``FactorizedLinear`` 4096x4096 rank 512, batch 1024, fwd+bwd, against ``nn.Linear`` and two
  plain ``nn.Linear``: with the input's gradient (a layer inside a network: 6 vs 3 matmuls, the 4x
  multiply-add ratio) and without it (the input a leaf: 5 vs 2 matmuls, a 3.2x ratio), each with a
  dense upstream gradient and with ``.sum().backward()`` (an expanded gradient the matmuls copy).

    OMP_NUM_THREADS=2 python bench/bench_speed_paths.py --rounds 7
    python bench/bench_speed_paths.py --only linear --threads 1
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import types
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import timm  # noqa: E402

import fnl  # noqa: E402
import fnl_timm  # noqa: E402,F401  (registers the models)

CL = torch.channels_last
PARTS = ('model', 'stage1', 'compile', 'compile_train', 'pad', 'convs', 'train_pair', 'linear')


def _resnet(rank_scale: Optional[float] = 0.111) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {} if rank_scale is None else {'rank_scale': rank_scale}
    model = timm.create_model('fnl_resnet20', num_classes=10, **kwargs)
    # each variant sets its memory format itself: the zoo's own conversion of CPU inputs to channels-last
    # is the variant 'fnl NCHW model, channels_last input'
    model.channels_last_inputs = False
    return model


def _unfolded(model: nn.Module) -> nn.Module:
    model.set_bn_folding(False)
    return model


def _infer(model: Callable, x: torch.Tensor) -> Callable[[], object]:
    if isinstance(model, nn.Module):
        model.eval()

    def run() -> None:
        with torch.no_grad():
            model(x)
    return run


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
           net: Optional[Callable] = None) -> Callable[[], torch.Tensor]:
    """One momentum-SGD step of ``model`` (forward through ``net``, e.g. a compiled ``model``); returns the loss."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    net = model if net is None else net

    def run() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return loss.detach()
    return run


def _table(title: str, fns: dict, rounds: int, grad: bool, ref: str, ideal: Optional[dict] = None) -> dict:
    names = list(fns)
    ms = dict(zip(names, fnl.measure_latency([fns[n] for n in names], 'cpu', repeats=rounds, warmup=1, grad=grad)))
    print(f'\n## {title} (median of {rounds} interleaved rounds; load average {os.getloadavg()[0]:.2f})')
    extra = ' | ideal (MAC ratio) | of the ideal' if ideal else ''
    print(f'| variant | ms | speed-up vs {ref}{extra} |\n|---|---|---|' + ('---|---|' if ideal else ''))
    for n in names:
        s = ms[ref] / ms[n]
        row = f'| {n} | {ms[n]:.1f} | {s:.2f}x'
        if ideal and n in ideal:
            row += f' | {ideal[n]:.2f}x | {s / ideal[n]:.2f}'
        elif ideal:
            row += ' | - | -'
        print(row + ' |')
    return ms


def part_model(rounds: int) -> None:
    torch.manual_seed(0)
    for title, x, grad in (('inference, batch 256', torch.randn(256, 3, 32, 32), False),
                           ('training step, batch 128', torch.randn(128, 3, 32, 32), True)):
        y = torch.randint(0, 10, (x.shape[0],))
        xc = x.contiguous(memory_format=CL)
        step = (lambda m, inp: _train(m, inp, y)) if grad else _infer
        fns = {
            'dense NCHW': step(_resnet(None), x),
            'dense channels_last': step(_resnet(None).to(memory_format=CL), xc),
            'fnl NCHW (fnl-train --no-channels-last)': step(_resnet(), x),
            'fnl channels_last (fnl-train default on the CPU)': step(_resnet().to(memory_format=CL), xc),
            'fnl NCHW model, channels_last input (the zoo models\' default)': step(_resnet(), xc),
            'two plain convs NCHW (to_inference_form)': step(fnl.to_inference_form(_resnet()), x),
            'two plain convs channels_last': step(fnl.to_inference_form(_resnet()).to(memory_format=CL), xc),
        }
        if not grad:  # the zoo folds BatchNorm into the convs in eager inference only
            fns['dense NCHW, BatchNorm not folded (set_bn_folding(False))'] = step(_unfolded(_resnet(None)), x)
            fns['fnl channels_last, BatchNorm not folded'] = step(_unfolded(_resnet()).to(memory_format=CL), xc)
            fns['fnl channels_last, bare rank (cpu_inference_rank_align = 0)'] = step(
                _cpu_rank_aligned(_resnet(), 0).to(memory_format=CL), xc)
            fns['fnl channels_last, rank padded to a multiple of 8'] = step(
                _cpu_rank_aligned(_resnet(), 8).to(memory_format=CL), xc)
        _table(f'fnl_resnet20 @0.111, {title}', fns, rounds, grad, 'dense NCHW')


def _pair_channels_last_inside(layer: fnl.FactorizedConv2d) -> fnl.FactorizedConv2d:
    """Run the layer's two convs channels-last and return its output in the input's (NCHW) format."""
    base = type(layer).forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return base(self, x.contiguous(memory_format=CL)).contiguous()
    layer.forward = types.MethodType(forward, layer)
    return layer


def _stage1(model: nn.Module, how: str) -> nn.Module:
    for m in model.modules():
        if isinstance(m, fnl.FactorizedConv2d) and m.rank == 5:  # the first stage's six layers
            if how == 'dense':
                m.path = 'dense'
            else:
                _pair_channels_last_inside(m)
    return model


def part_stage1(rounds: int) -> None:
    torch.manual_seed(0)
    layer = fnl.FactorizedConv2d(16, 16, 3, padding=1, bias=False, rank=5)
    dense_path = fnl.FactorizedConv2d(16, 16, 3, padding=1, bias=False, rank=5, path='dense')
    dense_path.load_state_dict(layer.state_dict())
    inside = _pair_channels_last_inside(fnl.FactorizedConv2d(16, 16, 3, padding=1, bias=False, rank=5))
    inside.load_state_dict(layer.state_dict())
    for batch, grad in ((256, False), (128, True)):
        x = torch.randn(batch, 16, 32, 32)
        xc = x.contiguous(memory_format=CL)
        for a, b in ((layer(x), inside(x)), (layer(x), dense_path(x))):
            assert torch.allclose(a, b, atol=1e-4), f'{(a - b).abs().max()}'

        def f(mod: nn.Module, inp: torch.Tensor) -> Callable[[], object]:
            inp = inp.clone().requires_grad_(grad)
            return (lambda: mod(inp).sum().backward()) if grad else (lambda: mod(inp))
        fns = {'pair NCHW': f(layer, x), "path='dense' NCHW": f(dense_path, x),
               'pair channels_last inside, NCHW out': f(inside, x), 'pair channels_last in and out': f(layer, xc),
               "path='dense' channels_last": f(dense_path, xc)}
        _table(f'one first-stage layer (16 -> 5 -> 16, 32x32), {"fwd+bwd" if grad else "fwd"}, batch {batch}',
               fns, rounds, grad, 'pair NCHW')
    torch.manual_seed(0)
    for title, x, grad in (('inference, batch 256', torch.randn(256, 3, 32, 32), False),
                           ('training step, batch 128', torch.randn(128, 3, 32, 32), True)):
        y = torch.randint(0, 10, (x.shape[0],))
        step = (lambda m, inp: _train(m, inp, y)) if grad else _infer
        xc = x.contiguous(memory_format=CL)
        fns = {'fnl NCHW': step(_resnet(), x),
               'fnl NCHW, stage 1 pairs channels_last inside': step(_stage1(_resnet(), 'inside'), x),
               "fnl NCHW, stage 1 path='dense'": step(_stage1(_resnet(), 'dense'), x),
               'fnl channels_last': step(_resnet().to(memory_format=CL), xc),
               "fnl channels_last, stage 1 path='dense'": step(_stage1(_resnet(), 'dense').to(memory_format=CL), xc)}
        _table(f'fnl_resnet20 @0.111 with first-stage variants, {title}', fns, rounds, grad, 'fnl NCHW')


def part_compile(rounds: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 3, 32, 32)
    xc = x.contiguous(memory_format=CL)
    eager_fast = fnl.fold_batchnorm(fnl.to_inference_form(_resnet()).eval()).to(memory_format=CL)
    fns = {'dense NCHW eager': _infer(_resnet(None), x),
           'dense, compile_for_inference': None,
           'fnl NCHW eager': _infer(_resnet(), x),
           'fnl channels_last eager': _infer(_resnet().to(memory_format=CL), xc),
           'fnl inference form + BN folded, channels_last, eager': _infer(eager_fast, xc),
           'fnl compile_for_inference, NCHW input': None,
           'fnl compile_for_inference, channels_last input': None}
    ref = _resnet().eval()
    with torch.no_grad():
        want = ref(x)
    for name, model, inp in (('dense, compile_for_inference', _resnet(None), x),
                             ('fnl compile_for_inference, NCHW input', _resnet(), x),
                             ('fnl compile_for_inference, channels_last input', _resnet(), xc)):
        t0 = time.perf_counter()
        compiled = fnl.compile_for_inference(model)
        with torch.no_grad():
            out = compiled(inp)
        print(f'{name}: first call (compile) {time.perf_counter() - t0:.1f} s')
        if name.startswith('fnl'):
            assert torch.allclose(out, want, atol=1e-4), f'{(out - want).abs().max()}'
        fns[name] = _infer(compiled, inp)
    _table('fnl_resnet20 @0.111 inference, batch 256: torch.compile deployment against eager', fns, rounds, False,
           'dense NCHW eager')


def _compiled_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, whole_step: bool) -> Callable[[], object]:
    """A training step with ``torch.compile`` of the model, or of the whole step; the first call compiles,
    and its loss is checked against an eager copy of the same model."""
    eager = copy.deepcopy(model).train()
    with torch.no_grad():
        want = F.cross_entropy(eager(x), y)
    step = _train(model, x, y, net=None if whole_step else torch.compile(model))
    run = torch.compile(step) if whole_step else step
    t0 = time.perf_counter()
    loss = run()
    print(f'{type(model).__name__} {"whole step" if whole_step else "model"} compiled: first call '
          f'{time.perf_counter() - t0:.1f} s, loss {loss.item():.5f} (eager {want.item():.5f})')
    assert torch.allclose(loss, want, rtol=1e-4, atol=1e-4), (loss, want)
    return run


def part_compile_train(rounds: int) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    xc = x.contiguous(memory_format=CL)
    fns = {'dense NCHW eager': _train(_resnet(None), x, y),
           'dense channels_last eager': _train(_resnet(None).to(memory_format=CL), xc, y),
           'fnl channels_last eager': _train(_resnet().to(memory_format=CL), xc, y),
           'two plain convs channels_last eager': _train(fnl.to_inference_form(_resnet()).to(memory_format=CL), xc, y),
           'dense channels_last, compiled model': _compiled_train(_resnet(None).to(memory_format=CL), xc, y, False),
           'fnl channels_last, compiled model': _compiled_train(_resnet().to(memory_format=CL), xc, y, False),
           'fnl channels_last, compiled step': _compiled_train(_resnet().to(memory_format=CL), xc, y, True),
           'two plain convs channels_last, compiled model': _compiled_train(
               fnl.to_inference_form(_resnet()).to(memory_format=CL), xc, y, False)}
    _table('fnl_resnet20 @0.111 training step, batch 128: torch.compile against eager', fns, rounds, True,
           'dense NCHW eager')


class _TwoLinear(nn.Module):
    def __init__(self, n: int, r: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(n, r, bias=False), nn.Linear(r, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def _padded(model: nn.Module, multiple: int = 8) -> nn.Module:
    """A copy of ``model`` whose factorized convs run with the rank padded to ``multiple`` on any input."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, fnl.FactorizedConv2d):
            m.rank_padding_for = lambda x, m=m: -m.rank % multiple
    return model


def _cpu_rank_aligned(model: nn.Module, align: int) -> nn.Module:
    """A copy of ``model`` whose factorized convs pad the rank to a multiple of ``align`` in channels-last
    CPU inference, whatever this CPU's default (0: the bare rank)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, fnl.FactorizedConv2d):
            m.cpu_inference_rank_align = align
    return model


def part_pad(rounds: int) -> None:
    torch.manual_seed(0)
    fns, macs = {}, {}
    for c, hw, r in ((16, 32, 5), (32, 16, 11), (64, 8, 21)):
        x = torch.randn(256, c, hw, hw).contiguous(memory_format=CL)
        layer = _cpu_rank_aligned(fnl.FactorizedConv2d(c, c, 3, padding=1, bias=False, rank=r).eval(), 8)
        dense = nn.Conv2d(c, c, 3, padding=1, bias=False).to(memory_format=CL).eval()
        with torch.no_grad():
            assert layer.conv_weights_for(x)[0].shape[0] == -(-r // 8) * 8
            assert torch.allclose(layer(x), _cpu_rank_aligned(layer, 0)(x), atol=1e-5)
        for label, mod, mac in ((f'{c}ch {hw}x{hw}: dense 3x3', dense, c * c * 9),
                                (f'{c}ch {hw}x{hw}: pair, rank {r}', _cpu_rank_aligned(layer, 0), 6 * c * r),
                                (f'{c}ch {hw}x{hw}: pair, rank {r} padded to {-(-r // 8) * 8}', layer, 6 * c * r)):
            fns[label] = _infer(mod, x)
            macs[label] = 256 * hw * hw * mac
    ms = _table('one conv layer of each ResNet-20 stage, channels-last, inference, batch 256', fns, rounds, False,
                next(iter(fns)))
    print('multiply-add rate (useful multiply-adds, GMAC/s): ' + ', '.join(f'{n} {macs[n] / ms[n] / 1e6:.1f}' for n in fns))
    for name, rank_scale, batch in (('fnl_resnet20', 0.111, 256), ('fnl_resnet20', 0.111, 16), ('fnl_resnet32_x2', 0.1, 128),
                                    ('fnl_vgg19', 0.1, 128), ('fnl_wrn28_10', 0.06667, 32)):
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10, rank_scale=rank_scale).eval()
        x = torch.randn(batch, 3, 32, 32)
        fns = {}
        for fmt, inp in (('channels_last', x.contiguous(memory_format=CL)), ('NCHW', x)):
            if name != 'fnl_resnet20' and fmt == 'NCHW':
                continue
            m = copy.deepcopy(model)
            m.channels_last_inputs = False  # the input's format decides
            fns[f'{fmt}, bare rank'] = _infer(_cpu_rank_aligned(m, 0), inp)
            padded = _cpu_rank_aligned(m, 8) if fmt == 'channels_last' else _padded(m)
            fns[f'{fmt}, rank padded to a multiple of 8'] = _infer(padded, inp)
        ranks = sorted({m.rank for m in model.modules() if isinstance(m, fnl.FactorizedConv2d)})
        _table(f'{name} @{rank_scale} inference, batch {batch}, ranks {ranks}', fns, rounds, False,
               'channels_last, bare rank')


def part_convs(rounds: int) -> None:
    torch.manual_seed(0)
    for c, hw, r in ((16, 32, 5), (32, 16, 11), (64, 8, 21)):
        x = torch.randn(256, c, hw, hw).contiguous(memory_format=CL)
        fns, macs = {}, {}
        dense = torch.randn(c, c, 3, 3).contiguous(memory_format=CL)
        fns['dense 3x3'], macs['dense 3x3'] = (lambda: F.conv2d(x, dense, None, 1, 1)), c * c * 9
        for rank in sorted({r, -(-r // 8) * 8, 16}):
            h = torch.randn(256, rank, hw, hw).contiguous(memory_format=CL)
            w_a = torch.randn(rank, c, 1, 3).contiguous(memory_format=CL)
            w_b = torch.randn(c, rank, 3, 1).contiguous(memory_format=CL)
            fns[f'1x3 {c} -> {rank}'] = lambda x=x, w=w_a: F.conv2d(x, w, None, 1, (0, 1))
            fns[f'3x1 {rank} -> {c}'] = lambda h=h, w=w_b: F.conv2d(h, w, None, 1, (1, 0))
            macs[f'1x3 {c} -> {rank}'] = macs[f'3x1 {rank} -> {c}'] = 3 * c * rank
        ms = _table(f'the convs of a {c}-channel {hw}x{hw} layer (model rank {r}), one by one, channels-last, '
                    'inference, batch 256', fns, rounds, False, 'dense 3x3')
        print('multiply-add rate (GMAC/s): ' + ', '.join(f'{n} {256 * hw * hw * macs[n] / ms[n] / 1e6:.1f}'
                                                       for n in fns))


def part_train_pair(rounds: int, blocks: int = 4) -> None:
    torch.manual_seed(0)
    x = torch.randn(128, 3, 32, 32).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (128,))
    fnl_step = _train(_resnet().to(memory_format=CL), x, y)
    plain_step = _train(fnl.to_inference_form(_resnet()).to(memory_format=CL), x, y)
    control = _train(_resnet().to(memory_format=CL), x, y)  # the same model again: the A/A spread
    print(f'\n## fnl_resnet20 @0.111 training step, batch 128, channels-last: fnl / two plain convs, '
          f'{blocks} blocks of {rounds} interleaved rounds, with an A/A control (a second fnl model) '
          f'(load average {os.getloadavg()[0]:.2f})')
    print('| block | fnl ms | two plain convs ms | fnl / plain | control / fnl |\n|---|---|---|---|---|')
    ratios, controls = [], []
    for b in range(blocks):
        t_fnl, t_plain, t_control = fnl.measure_latency([fnl_step, plain_step, control], 'cpu', repeats=rounds,
                                                        warmup=1, grad=True)
        ratios.append(t_fnl / t_plain)
        controls.append(t_control / t_fnl)
        print(f'| {b + 1} | {t_fnl:.1f} | {t_plain:.1f} | {ratios[-1]:.3f} | {controls[-1]:.3f} |')
    print(f'median fnl / plain {sorted(ratios)[len(ratios) // 2]:.3f}, range {min(ratios):.3f}-{max(ratios):.3f}; '
          f'control / fnl {min(controls):.3f}-{max(controls):.3f}')


def part_linear(rounds: int) -> None:
    n, batch, r = 4096, 1024, 512
    torch.manual_seed(0)
    layers = {'nn.Linear': nn.Linear(n, n), 'FactorizedLinear': fnl.FactorizedLinear(n, n, rank=r),
              'two nn.Linear': _TwoLinear(n, r)}
    g = torch.randn(batch, n)
    for input_grad, ratio in ((True, n / (2 * r)), (False, 2 * n / (5 * r))):
        x = torch.randn(batch, n, requires_grad=input_grad)
        for upstream in ('dense gradient', '.sum().backward()'):
            def step(layer: nn.Module) -> Callable[[], object]:
                def run() -> None:
                    layer.zero_grad(set_to_none=True)
                    x.grad = None
                    out = layer(x)
                    out.backward(g) if upstream == 'dense gradient' else out.sum().backward()
                return run
            fns = {k: step(v) for k, v in layers.items()}
            which = 'with' if input_grad else 'without'
            _table(f'{n}x{n} rank {r}, batch {batch}, fwd+bwd {which} the input gradient, {upstream}', fns,
                   rounds, True, 'nn.Linear', ideal={'FactorizedLinear': ratio, 'two nn.Linear': ratio})


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--only', nargs='*', default=list(PARTS), choices=PARTS, help='parts to run (default: all)')
    p.add_argument('--rounds', type=int, default=7, help='timed interleaved rounds per variant (default: 7)')
    p.add_argument('--threads', type=int, default=None,
                   help="torch CPU threads (default: torch's own choice, i.e. OMP_NUM_THREADS or the cores)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f'--rounds must be >= 1, got {args.rounds}')
    if args.threads is not None:
        if args.threads < 1:
            p.error(f'--threads must be >= 1, got {args.threads}')
        torch.set_num_threads(args.threads)
    print(f'# CPU speed paths, torch {torch.__version__}, {torch.get_num_threads()} threads, '
          f'CPU capability {torch.backends.cpu.get_cpu_capability()} (default cpu_inference_rank_align '
          f'{fnl.FactorizedConv2d.cpu_inference_rank_align}), load average {os.getloadavg()}')
    for part in args.only:
        globals()[f'part_{part}'](args.rounds)
    print(f'\nload average at the end {os.getloadavg()}')


if __name__ == '__main__':
    main()
