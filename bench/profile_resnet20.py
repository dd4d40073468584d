"""Where the time goes in ``fnl_resnet20`` at rank_scale 0.111 against the dense model, on the CPU.

Two parts, in one process:

1. A ``torch.profiler`` profile (CPU activities, input shapes recorded) of inference (eval, no_grad)
   and of one training step (forward, backward, SGD step) of the dense and the factorized model;
   prints each model's top ops by self CPU time, the time per op group (convolution, BatchNorm,
   ReLU, add, copies, ...) with the factorized/dense ratio, and the factorized model's convolutions
   by input shape.
2. Throughput of the variants that need no library change, timed side by side (interleaved rounds,
   medians, ``fnl.measure_latency``): channels-last model and input, ``path='factored'`` /
   ``path='dense'`` on every factorized conv, the paper's formulation (two plain convs,
   ``fnl.to_inference_form``), per-layer fastest paths (``fnl.select_fastest_paths``, inference) and
   ``torch.compile`` of the model (inductor). Each row gives images/s, the speed-up over the dense
   model and the dense/variant multiply-add ratio (the ideal speed-up).

    OMP_NUM_THREADS=2 python bench/profile_resnet20.py
    python bench/profile_resnet20.py --no-compile --rounds 3

Training steps use plain momentum SGD for every model (no Frobenius decay), so the rows compare the
networks themselves; bench/bench_fd.py measures the decay pass.
"""
from __future__ import annotations

import argparse
import copy
import os
import signal
import sys
import time
from typing import Callable, Optional, Sequence

import torch
from torch import nn

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import timm  # noqa: E402

import fnl  # noqa: E402
import fnl_timm  # noqa: E402,F401  (registers the models)

GROUPS = (  # (group, substrings of the aten op name), first match wins
    ('conv', ('conv',)),
    ('batch_norm', ('batch_norm',)),
    ('relu', ('relu', 'threshold', 'clamp_min')),
    ('copy/contiguous', ('copy', 'contiguous', 'clone', '_to_copy', 'aten::to', 'empty_like')),
    ('add (residual)', ('aten::add',)),
    ('optimizer (foreach)', ('_foreach',)),
    ('pool/fc/loss', ('pool', 'mean', 'addmm', 'aten::mm', 'linear', 'log_softmax', 'nll_loss', 'cross_entropy')),
    ('pad (shortcut)', ('pad', 'cat', 'slice')),
    ('alloc/view', ('empty', 'view', 'permute', 'reshape', 'unsqueeze', 'as_strided', 'transpose', 'resize',
                    'zero_', 'fill_', 'zeros')),
)


def _group(name: str) -> str:
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return 'other'


def _model(rank_scale: Optional[float]) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {} if rank_scale is None else {'rank_scale': rank_scale}
    return timm.create_model('fnl_resnet20', num_classes=10, **kwargs)


def _set_path(model: nn.Module, path: str) -> nn.Module:
    for m in model.modules():
        if isinstance(m, fnl.FactorizedConv2d):
            m.path = path
    return model


def _infer_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    model.eval()

    def run() -> None:
        with torch.no_grad():
            model(x)
    return run


def _train_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, forward: Optional[Callable] = None
              ) -> Callable[[], object]:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    fwd = forward if forward is not None else model

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(fwd(x), y).backward()
        opt.step()
    return run


def profile_ops(fn: Callable[[], object], steps: int, grad: bool) -> dict:
    """Self CPU microseconds and calls per aten op, averaged over ``steps`` profiled calls.

    One untimed call first, then one profiler session whose first call is its warm-up (the
    profiler's own start-up cost lands there and is discarded: ``torch.profiler.schedule``).
    """
    from torch.profiler import ProfilerActivity, profile, schedule
    with torch.set_grad_enabled(grad):
        fn()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True,
                     schedule=schedule(wait=0, warmup=1, active=steps)) as prof:
            for i in range(steps + 1):
                fn()
                if i < steps:  # a step() after the last call would end the cycle and drop its events
                    prof.step()
    events = prof.key_averages()
    out: dict = {e.key: (e.self_cpu_time_total / steps, e.count // steps) for e in events
                 if e.key.startswith('aten::') or e.key.startswith('mkldnn')}
    out['__total__'] = (sum(e.self_cpu_time_total for e in events) / steps, 0)
    out['__conv_shapes__'] = {(e.key, str(e.input_shapes[:2])): e.self_cpu_time_total / steps
                              for e in prof.key_averages(group_by_input_shape=True) if 'convolution' in e.key}
    return out


def print_profile(title: str, dense: dict, fact: dict, top: int) -> None:
    print(f'\n## profile: {title} (self CPU ms per call)')
    for label, prof in (('dense', dense), ('factorized', fact)):
        ops = sorted(((k, v) for k, v in prof.items() if not k.startswith('__')), key=lambda kv: -kv[1][0])
        print(f'\n{label}: total self CPU {prof["__total__"][0] / 1e3:.1f} ms')
        print(f'| op | calls | self ms | share |\n|---|---|---|---|')
        for k, (us, n) in ops[:top]:
            print(f'| {k} | {n} | {us / 1e3:.2f} | {100 * us / prof["__total__"][0]:.1f}% |')
    groups: dict[str, list[float]] = {}
    for i, prof in enumerate((dense, fact)):
        for k, v in prof.items():
            if k.startswith('__'):
                continue
            g = groups.setdefault(_group(k), [0.0, 0.0, 0, 0])
            g[i] += v[0]
            g[2 + i] += v[1]
    print(f'\nop groups, {title}:')
    print('| group | dense ms (calls) | factorized ms (calls) | factorized / dense |\n|---|---|---|---|')
    for g, (d, f, nd, nf) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        ratio = f'{f / d:.2f}' if d > 0 else '-'
        print(f'| {g} | {d / 1e3:.2f} ({nd}) | {f / 1e3:.2f} ({nf}) | {ratio} |')
    td, tf = dense['__total__'][0], fact['__total__'][0]
    print(f'| **total** | {td / 1e3:.2f} | {tf / 1e3:.2f} | {tf / td:.2f} |')
    shapes = sorted(fact['__conv_shapes__'].items(), key=lambda kv: -kv[1])
    print(f'\nfactorized model, {title}: convolution ops by input shapes [input, weight] (top {top})')
    print('| op | shapes | self ms |\n|---|---|---|')
    for (k, s), us in shapes[:top]:
        print(f'| {k} | {s} | {us / 1e3:.2f} |')


class _Timeout(Exception):
    pass


def _with_timeout(fn: Callable[[], object], seconds: int) -> float:
    """Seconds ``fn`` took; raises ``_Timeout`` after ``seconds`` (SIGALRM, main thread only)."""
    def handler(signum, frame):
        raise _Timeout()
    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    t0 = time.perf_counter()
    try:
        fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return time.perf_counter() - t0


def build_variants(train: bool, x: torch.Tensor, y: torch.Tensor, compile_: bool, compile_timeout: int,
                   notes: list) -> dict[str, tuple[Callable[[], object], int]]:
    """name -> (step function, multiply-adds per image of the network it runs)."""
    cl = torch.channels_last
    xs = {'nchw': x, 'cl': x.contiguous(memory_format=cl)}
    models: dict[str, tuple[nn.Module, str]] = {}
    models['dense'] = (_model(None), 'nchw')
    models['dense channels_last'] = (_model(None).to(memory_format=cl), 'cl')
    models['fnl (auto path)'] = (_model(0.111), 'nchw')
    models['fnl channels_last'] = (_model(0.111).to(memory_format=cl), 'cl')
    models['fnl path=dense'] = (_set_path(_model(0.111), 'dense'), 'nchw')
    models['fnl path=dense channels_last'] = (_set_path(_model(0.111), 'dense').to(memory_format=cl), 'cl')
    models['two plain convs (to_inference_form)'] = (fnl.to_inference_form(_model(0.111)), 'nchw')
    models['two plain convs channels_last'] = (fnl.to_inference_form(_model(0.111)).to(memory_format=cl), 'cl')
    if not train:
        fastest = _model(0.111).eval()
        t0 = time.perf_counter()
        chosen = fnl.select_fastest_paths(fastest, x[:1], batch_size=x.shape[0], repeats=5)
        kept = sum(v['kept'] for v in chosen.values())
        notes.append(f'select_fastest_paths at batch {x.shape[0]}: kept {kept} of {len(chosen)} layers factorized, '
                     f'{time.perf_counter() - t0:.1f} s')
        models['fastest paths (select_fastest_paths)'] = (fastest, 'nchw')
    fns: dict[str, tuple[Callable[[], object], int]] = {}
    for name, (m, fmt) in models.items():
        macs = fnl.count_macs(m, (3, 32, 32))
        fns[name] = (_train_fn(m, xs[fmt], y) if train else _infer_fn(m, xs[fmt]), macs)
    if compile_:
        for name, base in (('dense', 'dense channels_last'), ('fnl', 'fnl channels_last')):
            m, fmt = models[base]
            compiled = torch.compile(m)
            fn = _train_fn(m, xs[fmt], y, compiled) if train else _infer_fn(compiled, xs[fmt])
            label = f'torch.compile {name} channels_last'
            try:
                with torch.set_grad_enabled(train):
                    secs = _with_timeout(fn, compile_timeout)
                notes.append(f'{label} ({"train" if train else "inference"}): first call (compile) {secs:.1f} s')
                fns[label] = (fn, fns[base][1])
            except _Timeout:
                notes.append(f'{label} ({"train" if train else "inference"}): compile exceeded {compile_timeout} s, '
                             'not timed')
            except Exception as e:  # noqa: BLE001 - record the failure, time the rest
                notes.append(f'{label}: compile failed, {type(e).__name__}: {str(e).splitlines()[0][:200]}')
    return fns


def time_variants(title: str, fns: dict, batch: int, rounds: int, grad: bool) -> None:
    names = list(fns)
    ms = fnl.measure_latency([fns[n][0] for n in names], 'cpu', repeats=rounds, warmup=1, grad=grad)
    t = dict(zip(names, ms))
    dense_ms, dense_macs = t['dense'], fns['dense'][1]
    print(f'\n## {title}: batch {batch}, median of {rounds} interleaved rounds')
    print('| variant | ms | images/s | speed-up vs dense | MAC ratio dense / variant |\n|---|---|---|---|---|')
    for n in names:
        print(f'| {n} | {t[n]:.1f} | {batch / t[n] * 1e3:.0f} | {dense_ms / t[n]:.2f}x | '
              f'{dense_macs / fns[n][1]:.2f}x |')


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--infer-batch', type=int, default=256, help='inference batch size (default: 256)')
    p.add_argument('--train-batch', type=int, default=128, help='training batch size (default: 128)')
    p.add_argument('--profile-steps', type=int, default=3, help='profiled calls per model and mode, after one profiler warm-up call (default: 3)')
    p.add_argument('--rounds', type=int, default=5, help='timed interleaved rounds per variant (default: 5)')
    p.add_argument('--top', type=int, default=10, help='rows of the per-op and per-shape tables (default: 10)')
    p.add_argument('--threads', type=int, default=None,
                   help='torch CPU threads (default: torch\'s own choice, i.e. OMP_NUM_THREADS or the cores)')
    p.add_argument('--no-compile', action='store_true', help='skip the torch.compile variants')
    p.add_argument('--compile-timeout', type=int, default=180,
                   help='seconds allowed for each torch.compile first call before it is given up (default: 180)')
    p.add_argument('--skip', nargs='*', default=[], choices=['profile', 'infer', 'train'],
                   help='parts to leave out (default: none)')
    args = p.parse_args(argv)
    for name in ('infer_batch', 'train_batch', 'profile_steps', 'rounds', 'top', 'compile_timeout'):
        if getattr(args, name) < 1:
            p.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if args.threads is not None:
        if args.threads < 1:
            p.error(f'--threads must be >= 1, got {args.threads}')
        torch.set_num_threads(args.threads)
    print(f'# fnl_resnet20 dense vs rank_scale 0.111, CPU, torch {torch.__version__}, '
          f'{torch.get_num_threads()} threads, load average {os.getloadavg()}')
    torch.manual_seed(0)
    xi = torch.randn(args.infer_batch, 3, 32, 32)
    xt = torch.randn(args.train_batch, 3, 32, 32)
    yt = torch.randint(0, 10, (args.train_batch,))
    dense, fact = _model(None), _model(0.111)
    print(f'MACs per image: dense {fnl.count_macs(dense, (3, 32, 32)):,}, factorized '
          f'{fnl.count_macs(fact, (3, 32, 32)):,} (ratio {fnl.count_macs(dense, (3, 32, 32)) / fnl.count_macs(fact, (3, 32, 32)):.2f}x)')
    if 'profile' not in args.skip:
        pd = profile_ops(_infer_fn(dense, xi), args.profile_steps, False)
        pf = profile_ops(_infer_fn(fact, xi), args.profile_steps, False)
        print_profile(f'inference, batch {args.infer_batch}', pd, pf, args.top)
        pd = profile_ops(_train_fn(dense, xt, yt), args.profile_steps, True)
        pf = profile_ops(_train_fn(fact, xt, yt), args.profile_steps, True)
        print_profile(f'training step, batch {args.train_batch}', pd, pf, args.top)
    notes: list = []
    if 'infer' not in args.skip:
        fns = build_variants(False, xi, yt, not args.no_compile, args.compile_timeout, notes)
        time_variants('inference (eval, no_grad)', fns, args.infer_batch, args.rounds, False)
    if 'train' not in args.skip:
        fns = build_variants(True, xt, yt, not args.no_compile, args.compile_timeout, notes)
        time_variants('training step (forward, backward, momentum SGD)', fns, args.train_batch, args.rounds, True)
    for n in notes:
        print(f'note: {n}')
    print(f'load average at the end {os.getloadavg()}')


if __name__ == '__main__':
    main()
