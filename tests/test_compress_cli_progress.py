"""fnl-compress shows its progress (issue 18): every stage is logged as it starts and ends, the
fine-tuning draws a tqdm bar on a terminal and logs timm-style lines otherwise, its losses are read
from the device once per log interval (issue 15), and the ONNX exporter's pass chatter stays out of
the output. Tiny model (fnl_test_resnet at 16x16, random weights), a few steps."""
import logging
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

timm = pytest.importorskip('timm')
import fnl  # noqa: E402
import fnl_timm  # noqa: E402,F401
from fnl.export import export_model  # noqa: E402
from fnl_timm import compress as cli  # noqa: E402
from fnl_timm import compress_outputs, compress_pipeline  # noqa: E402


class _Events(logging.Handler):
    """Collects the fnl_compress log lines, interleaved with the calls the test marks."""

    def __init__(self, events):
        super().__init__(logging.INFO)
        self.events = events

    def emit(self, record):
        self.events.append(record.getMessage())


def _marked(monkeypatch, events, owner, name):
    original = getattr(owner, name)

    def call(*args, **kwargs):
        events.append(f'CALL {name}')
        out = original(*args, **kwargs)
        events.append(f'DONE {name}')
        return out
    monkeypatch.setattr(owner, name, call)


def test_stage_lines_appear_in_order_as_each_stage_runs(tmp_path, monkeypatch):
    events = []
    handler = _Events(events)
    log = logging.getLogger('fnl_compress')
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    for owner, name in ((cli.fnl_data, 'create_datasets'), (cli, 'load_model'), (fnl, 'compress'),
                        (compress_pipeline, 'finetune'), (fnl, 'select_fastest_paths'),
                        (compress_pipeline, 'measure_models'), (compress_outputs, 'export_model')):
        _marked(monkeypatch, events, owner, name)
    try:
        code = cli.main(['--model', 'fnl_test_resnet', '--random-init', '--dataset', 'digits', '--img-size', '16',
                         '--target-ratio', '0.5', '--finetune-epochs', '1', '--finetune-steps', '4',
                         '--log-interval', '2', '--eval-batches', '1', '--latency-repeats', '3',
                         '--export', 'torchscript', '--output', str(tmp_path / 'out')])
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    assert code == 0

    def at(prefix):
        hits = [i for i, e in enumerate(events) if e.startswith(prefix)]
        assert len(hits) == 1, (prefix, events)
        return hits[0]

    order = ['data: digits ...', 'CALL create_datasets', 'DONE create_datasets',
             'data: 1,437 training and 360 validation images', 'load: fnl_test_resnet (random', 'CALL load_model',
             'DONE load_model', 'load: CifarResNet', 'factorize: SVD', 'CALL compress', 'DONE compress', 'factorize: ',
             'evaluate: original model ...', 'evaluate: original model top-1', 'evaluate: compressed model ...',
             'fine-tune: 4 steps of fdmomentum', 'CALL finetune', 'Fine-tune: [2/4 ( 50%)]', 'Fine-tune: [4/4 (100%)]',
             'DONE finetune', 'fine-tune: loss', 'evaluate: finetuned model ...', 'paths: timing',
             'CALL select_fastest_paths', 'DONE select_fastest_paths', 'paths: ', 'latency: timing',
             'CALL measure_models', 'DONE measure_models', 'latency: original', 'write: ', 'export: torchscript to',
             'CALL export_model', 'DONE export_model', 'export: torchscript checked', 'compression target_ratio=0.5']
    positions = [at(p) if not p.endswith(': ') else
                 next(i for i, e in enumerate(events) if e.startswith(p) and i > at(order[k - 1]))
                 for k, p in enumerate(order)]
    assert positions == sorted(positions), [events[i] for i in positions]
    assert events[-1].startswith('compression target_ratio=0.5')  # the report comes last, everything before it


def test_log_interval_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(['--model', 'fnl_test_resnet', '--random-init', '--input-size', '3', '16', '16', '--target-ratio',
                  '0.5', '--log-interval', '0', '--output', str(tmp_path / 'o')])
    assert e.value.code == 2 and '--log-interval must be >= 1, got 0' in capsys.readouterr().err


def _tiny(steps_per_epoch=6):
    torch.manual_seed(0)
    model = timm.create_model('fnl_test_resnet', num_classes=10, rank_scale=0.5)
    data = TensorDataset(torch.randn(4 * steps_per_epoch, 3, 16, 16), torch.randint(0, 10, (4 * steps_per_epoch,)))
    return model, DataLoader(data, batch_size=4, shuffle=False)


class _Recording(nn.CrossEntropyLoss):
    """The fine-tune's loss, keeping each step's value (as a tensor: no sync in the loop)."""
    seen = []

    def forward(self, logits, target):
        out = super().forward(logits, target)
        _Recording.seen.append(out.detach().clone())
        return out


def test_finetune_reports_the_step_losses_and_logs_every_interval(monkeypatch, caplog):
    _Recording.seen = []
    monkeypatch.setattr(compress_pipeline.nn, 'CrossEntropyLoss', _Recording)
    model, loader = _tiny()
    with caplog.at_level('INFO', logger='fnl_compress'):
        ft = compress_pipeline.finetune(model, loader, torch.device('cpu'), epochs=1, max_steps=5, progress=False,
                                        log_interval=2)
    losses = [float(t) for t in _Recording.seen]
    assert ft['steps'] == len(losses) == 5
    assert ft['mean_loss'] == pytest.approx(sum(losses) / 5, rel=1e-6, abs=0)
    assert (ft['first_loss'], ft['last_loss']) == (losses[0], losses[-1])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Fine-tune: ')]
    assert [line.split(']')[0] for line in lines] == ['Fine-tune: [2/5 ( 40%)', 'Fine-tune: [4/5 ( 80%)',
                                                      'Fine-tune: [5/5 (100%)']
    for line, n in zip(lines, (2, 4, 5)):  # this step's loss and the mean so far
        assert f'loss {losses[n - 1]:.4f} ({sum(losses[:n]) / n:.4f})' in line, (line, losses)


def test_finetune_reads_the_loss_once_per_interval_not_per_step(monkeypatch):
    """Host reads of tensors (float(), .item(), .tolist()) do not grow with the number of steps."""
    reads = []
    for name in ('__float__', 'item', 'tolist'):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            reads.append(1)
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)

    def count(steps):
        model, loader = _tiny(steps_per_epoch=12)
        reads.clear()
        compress_pipeline.finetune(model, loader, torch.device('cpu'), epochs=1, max_steps=steps, progress=False,
                                   log_interval=1000)
        return len(reads)
    assert count(3) == count(11) > 0


def test_finetune_progress_bar_on_request(capsys, caplog):
    model, loader = _tiny()
    with caplog.at_level('INFO', logger='fnl_compress'):
        ft = compress_pipeline.finetune(model, loader, torch.device('cpu'), epochs=1, max_steps=4, progress=True,
                                        log_interval=2)
    err = capsys.readouterr().err
    assert ft['steps'] == 4 and 'fine-tune' in err and '4/4' in err and 'loss=' in err, err
    assert not [r for r in caplog.records if r.getMessage().startswith('Fine-tune: ')]  # the bar replaces the lines


def test_onnx_export_prints_no_pass_chatter(tmp_path, capfd):
    """fnl-compress logs at INFO on the root logger; the ONNX exporter's passes log every step there
    ("Replaced initializer ..." for two equal weights, "Removed 8 unused nodes", ...). None of it shows,
    their loggers' levels come back afterwards, and onnxruntime still runs the model."""
    pytest.importorskip('onnx')
    ort = pytest.importorskip('onnxruntime')
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)).eval()
    model[2].load_state_dict(model[0].state_dict())  # equal initializers: the exporter de-duplicates them
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    before = {n: logging.getLogger(n).level for n in ('onnx_ir', 'onnxscript', 'torch.onnx')}
    try:
        r = export_model(model, torch.randn(2, 4), tmp_path / 'm.onnx', 'onnx')
        logging.getLogger('onnx_ir.passes.common.initializer_deduplication').info('still shown after the export')
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    out = capfd.readouterr()
    text = out.out + out.err
    assert 'Replaced initializer' not in text and 'unused nodes' not in text and 'PassManager' not in text, text
    assert 'still shown after the export' in text
    assert {n: logging.getLogger(n).level for n in before} == before
    assert r['max_abs_diff'] is not None and r['max_abs_diff'] < 1e-5
    x = torch.randn(3, 4)
    got = ort.InferenceSession(str(tmp_path / 'm.onnx'), providers=['CPUExecutionProvider']).run(
        None, {'input': x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), model(x).detach(), atol=1e-6), got
