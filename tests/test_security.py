"""No input file runs code when it is read, unless the user says so (issue 14).

A payload checkpoint (a pickle whose ``__reduce__`` calls ``pathlib.Path.touch`` on a marker file, a
harmless stand-in for ``os.system``) is given to every command and API that reads a file: each must
refuse it with one clear message and the marker must not exist. A control loads the same file with
the full unpickler and sees the marker appear, so the payload is live. Broken inputs (truncated,
random bytes, empty, a folder, missing, a checkpoint of another architecture) get one-line errors
naming the argument, and nothing in the input folder is written or deleted. ``--trust-pickle``
loads fnl-compress's ``model.pt``; fairseq settings that fairseq would ``eval()`` and fd_adam's
``--adam-betas`` are read as literals. The CLIs run in-process (a few seconds each).
"""
import argparse
import hashlib
import os
import pathlib
import random

import pytest
import torch

timm = pytest.importorskip('timm')
import fnl  # noqa: E402
import fnl_timm  # noqa: E402,F401
from fnl._serialization import UntrustedPickleError  # noqa: E402
from fnl_timm import compress as cli  # noqa: E402
from fnl_timm import train as fnl_train  # noqa: E402
from fnl_timm._serialization import load_file  # noqa: E402

TRAIN = ['--model', 'fnl_test_resnet', '--img-size', '16', '--batch-size', '32', '--workers', '0', '--epochs', '1',
         '--limit-train-batches', '1', '--limit-val-batches', '1', '--no-progress', '--no-tensorboard']
COMPRESS = ['--input-size', '3', '16', '16', '--target-ratio', '0.5', '--no-latency']
KINDS = ['payload', 'truncated', 'random', 'empty', 'directory', 'missing', 'other_arch']


class Payload:
    """Unpickling it creates the file ``marker`` (``pathlib.Path.touch``): what ``os.system`` would be."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _folder_digest(folder: pathlib.Path) -> str:
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(dirs + files):
            p = pathlib.Path(root) / name
            h.update(str(p.relative_to(folder)).encode())
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def _make_input(kind: str, folder: pathlib.Path, marker: pathlib.Path, other) -> pathlib.Path:
    """The bad file of one kind in ``folder``; ``other()`` writes a readable file of another architecture."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / 'input.pth'
    if kind == 'payload':
        torch.save({'state_dict': {'w': torch.ones(2)}, 'extra': Payload(marker)}, path)
    elif kind == 'truncated':
        torch.save({'state_dict': timm.create_model('fnl_test_resnet').state_dict()}, path)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif kind == 'random':
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind == 'empty':
        path.write_bytes(b'')
    elif kind == 'directory':
        path.mkdir()
        (path / 'inside.txt').write_text('a folder given as a file')
    elif kind == 'other_arch':
        torch.save(other(), path)
    return path  # 'missing': never created


def _other_state_dict():
    return {'state_dict': timm.create_model('fnl_resnet20').state_dict(), 'epoch': 0}


# --- every file-reading command and API of the timm side -------------------------------------------
def _train(flags):
    def call(path, tmp_path, capsys):
        try:  # argument errors exit through argparse (usage, then one error line); setup errors return 2
            code = fnl_train.main(TRAIN + [a.replace('{}', str(path)) for a in flags] +
                                  ['--output', str(tmp_path / 'runs')])
        except SystemExit as e:
            code = e.code
        return code, _without_usage(capsys.readouterr().err)
    return call


def _without_usage(err: str) -> str:
    """argparse prints the usage block before its one error line."""
    return '\n'.join(line for line in err.splitlines() if 'error:' in line) if 'usage:' in err else err


def _compress(flags):
    def call(path, tmp_path, capsys):
        with pytest.raises(SystemExit) as e:
            cli.main([a.replace('{}', str(path)) for a in flags] + COMPRESS + ['--output', str(tmp_path / 'out')])
        assert not (tmp_path / 'out' / 'model.pt').exists()
        return e.value.code, _without_usage(capsys.readouterr().err)
    return call


def _api(fn):
    def call(path, tmp_path, capsys):
        with pytest.raises(ValueError) as e:
            fn(str(path))
        return 'raised', str(e.value)
    return call


def _compressed_other():
    # a compressed.pth whose recipe names another architecture than its weights
    return {'arch': 'fnl_resnet20', 'model_kwargs': {}, 'ranks': {}, 'form': 'factorized',
            'state_dict': timm.create_model('fnl_test_resnet').state_dict()}


TIMM_READERS = {
    # name: (call, argument named in errors, file of another architecture)
    'fnl-train --resume': (_train(['--resume', '{}']), '--resume', _other_state_dict),
    'fnl-train --initial-checkpoint': (_train(['--initial-checkpoint', '{}']), '--initial-checkpoint',
                                       _other_state_dict),
    'fnl-train --normalize': (_train(['--rank-scale', '0.5', '--wd2fd', '--no-frob', '--normalize', '{}']),
                              '--normalize', lambda: torch.ones(1, 3, 99)),
    'fnl-compress --checkpoint': (_compress(['--model', 'fnl_test_resnet', '--checkpoint', '{}']), '--checkpoint',
                                  _other_state_dict),
    'fnl-compress --model': (_compress(['--model', '{}']), '--model', _other_state_dict),
    'fnl.load_frobnorms': (_api(fnl.load_frobnorms), 'path', lambda: torch.ones(4, 3)),
    'fnl_timm.compress.load_compressed': (_api(cli.load_compressed), 'path', _compressed_other),
}


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('reader', list(TIMM_READERS))
def test_timm_readers_refuse_bad_files(reader, kind, tmp_path, capsys):
    call, arg, other = TIMM_READERS[reader]
    marker = tmp_path / 'MARKER'
    folder = tmp_path / 'in'
    path = _make_input(kind, folder, marker, other)
    before = _folder_digest(folder)
    code, message = call(path, tmp_path, capsys)
    assert code in (2, 'raised'), (code, message)
    lines = [line for line in message.strip().splitlines() if line.strip()]
    assert len(lines) == 1, message  # one clear line
    assert arg in lines[0], lines[0]
    assert str(path) in lines[0] or (kind == 'other_arch' and reader == 'fnl-train --resume'), lines[0]
    if kind == 'payload':
        assert 'is refused' in lines[0] and 'arbitrary code' in lines[0], lines[0]
    assert not marker.exists(), 'the payload ran'
    assert _folder_digest(folder) == before  # nothing written or deleted next to the input


def test_payload_is_live_with_the_full_unpickler(tmp_path):
    """The control: the same payload does create its marker when the user trusts the file."""
    marker = tmp_path / 'MARKER'
    path = _make_input('payload', tmp_path / 'in', marker, None)
    with pytest.raises(UntrustedPickleError, match='--trust-pickle'):
        load_file(path, '--checkpoint')
    assert not marker.exists()
    load_file(path, '--checkpoint', trust_pickle=True)
    assert marker.exists()


def test_trust_pickle_loads_model_pt(tmp_path, capsys):
    """fnl-compress's model.pt (a whole pickled module) needs --trust-pickle; with it, it compresses again.
    compressed.pth needs no unpickling at all."""
    first = tmp_path / 'first'
    # --finalize collapse: a dense model.pt whatever the timings (the default, fastest, keeps a layer factorized
    # or collapses it by measured speed, and the second run's reachable ratio then varied: 0.5 failed once)
    collapse = ['--finalize', 'collapse']
    assert cli.main(['--model', 'fnl_test_resnet', '--random-init', *COMPRESS, *collapse, '--output', str(first)]) == 0
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(first / 'compressed.pth')) == []
    argv = ['--model', str(first / 'model.pt'), *COMPRESS, *collapse, '--output', str(tmp_path / 'second')]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and '--trust-pickle' in err and 'arbitrary code' in err, err
    assert 'fnl_timm.models' in err or 'fnl.' in err, err  # names what the pickle holds
    assert cli.main(argv + ['--trust-pickle']) == 0
    assert sorted(os.listdir(tmp_path / 'second')) == ['model.pt', 'report.json', 'report.png', 'report.txt']


def test_torchscript_checkpoint_needs_trust(tmp_path, capsys):
    """A TorchScript file is a program: as --checkpoint it loads only with --trust-pickle."""
    net = timm.create_model('fnl_test_resnet').eval()
    ts = tmp_path / 'in' / 'net.ts'
    ts.parent.mkdir()
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 3, 16, 16)), str(ts))
    argv = ['--model', 'fnl_test_resnet', '--checkpoint', str(ts), *COMPRESS, '--output', str(tmp_path / 'o')]
    with pytest.raises(SystemExit):
        cli.main(argv)
    err = capsys.readouterr().err
    assert 'TorchScript program' in err and '--trust-pickle' in err, err
    assert cli.main(argv + ['--trust-pickle']) == 0


def test_compress_help_texts():
    """Every fnl-compress flag has a help text, and a default is shown at most once (never 'None')."""
    parser = cli.build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        assert action.help, action.option_strings
        text = formatter._get_help_string(action) % {'default': action.default, 'prog': 'fnl-compress'}
        assert text.count('default') <= 1 and '(default: None)' not in text, (action.option_strings, text)


# --- fairseq ---------------------------------------------------------------------------------------
fairseq = pytest.importorskip('fairseq')
import fnl_fairseq  # noqa: E402
from fnl_fairseq.optim import literal_betas  # noqa: E402

USER_DIR = fnl_fairseq.user_dir()
TINY = ['--encoder-embed-dim', '16', '--decoder-embed-dim', '16', '--encoder-ffn-embed-dim', '32',
        '--decoder-ffn-embed-dim', '32', '--encoder-layers', '1', '--decoder-layers', '1',
        '--encoder-attention-heads', '2', '--decoder-attention-heads', '2']


def _fairseq_train(data, save_dir, extra=()):
    from fairseq import distributed_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import train
    argv = [str(data), '--user-dir', USER_DIR, '--arch', 'fnl_transformer_small', '--optimizer', 'fd_adam',
            '--lr', '0.001', '--max-tokens', '500', '--cpu', '--save-dir', str(save_dir), '--max-update', '1',
            '--no-epoch-checkpoints', '--disable-validation', '--no-progress-bar', *TINY, *extra]
    args = options.parse_args_and_arch(options.get_training_parser(), input_args=argv)
    distributed_utils.call_main(convert_namespace_to_omegaconf(args), train.main)


@pytest.fixture(scope='module')
def fairseq_run(tmp_path_factory):
    """A tiny binarized corpus and a one-update fnl_transformer checkpoint (fd_adam, rank 0.5, FD)."""
    from fairseq import options
    from fairseq_cli import preprocess
    from fnl_fairseq.toy import make_toy_corpus
    root = tmp_path_factory.mktemp('fairseq_security')
    make_toy_corpus(str(root / 'raw'), n_train=40, n_valid=8, n_test=8, vocab=12, seed=3)
    preprocess.main(options.get_preprocessing_parser().parse_args([
        '--source-lang', 'src', '--target-lang', 'tgt', '--trainpref', str(root / 'raw' / 'train'),
        '--validpref', str(root / 'raw' / 'valid'), '--testpref', str(root / 'raw' / 'test'),
        '--destdir', str(root / 'bin'), '--joined-dictionary', '--workers', '1']))
    _fairseq_train(root / 'bin', root / 'ckpt', ['--rank-scale', '0.5', '--wd2fd', '--weight-decay', '0.01',
                                                 '--adam-betas', '(0.9, 0.98)'])
    return root


def _generate(path, root):
    from fairseq import options
    from fairseq_cli import generate
    return generate.main(options.parse_args_and_arch(options.get_generation_parser(), input_args=[
        str(root / 'bin'), '--user-dir', USER_DIR, '--path', str(path), '--cpu', '--beam', '1', '--max-len-b', '3',
        '--gen-subset', 'test', '--no-progress-bar']))


def _interactive(path, root):
    from fairseq import distributed_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import interactive
    source = root / 'one_line.txt'
    source.write_text((root / 'raw' / 'test.src').read_text().splitlines()[0] + '\n')
    args = options.parse_args_and_arch(options.get_interactive_generation_parser(), input_args=[
        str(root / 'bin'), '--user-dir', USER_DIR, '--path', str(path), '--cpu', '--beam', '1',
        '--source-lang', 'src', '--target-lang', 'tgt', '--input', str(source)])
    distributed_utils.call_main(convert_namespace_to_omegaconf(args), interactive.main)


def _restore(path, root):
    _fairseq_train(root / 'bin', root / f'restored_{path.name}', ['--restore-file', str(path)])


def _from_pretrained(path, root):
    from fnl_fairseq import FNLTransformerModel
    FNLTransformerModel.from_pretrained(str(path.parent), checkpoint_file=path.name,
                                        data_name_or_path=str(root / 'bin'), user_dir=USER_DIR)


FAIRSEQ_READERS = {'fairseq-generate --path': _generate, 'fairseq-interactive --path': _interactive,
                   'fairseq-train --restore-file': _restore, 'FNLTransformerModel.from_pretrained': _from_pretrained}


def _fairseq_kinds(reader):
    # fairseq-train --restore-file with a missing file (or a folder) starts afresh: fairseq's documented
    # behaviour for its default checkpoint_last.pt, so not an error there
    return [k for k in KINDS if not (reader.startswith('fairseq-train') and k in ('missing', 'directory'))]


@pytest.mark.parametrize('reader,kind', [(r, k) for r in FAIRSEQ_READERS for k in _fairseq_kinds(r)])
def test_fairseq_readers_refuse_bad_files(fairseq_run, reader, kind, tmp_path):
    marker = tmp_path / 'MARKER'
    folder = tmp_path / 'in'
    path = _make_input(kind, folder, marker, _other_state_dict)
    if kind == 'missing':
        folder.mkdir(exist_ok=True)
    before = _folder_digest(folder)
    with pytest.raises((ValueError, OSError)) as e:
        FAIRSEQ_READERS[reader](path, fairseq_run)
    message = str(e.value)
    assert len(message.strip().splitlines()) == 1 and str(path) in message, message
    expected = {'payload': 'is refused', 'truncated': 'not a readable torch.save file',
                'random': 'not a readable torch.save file', 'empty': 'is empty', 'directory': 'is a folder',
                'missing': 'not found', 'other_arch': 'is not a fairseq checkpoint'}[kind]
    assert expected in message, message
    assert not marker.exists(), 'the payload ran'
    assert _folder_digest(folder) == before


@pytest.mark.parametrize('reader', ['fairseq-generate --path', 'FNLTransformerModel.from_pretrained'])
def test_fairseq_checkpoint_strings_are_not_evaluated(fairseq_run, reader, tmp_path):
    """A checkpoint whose config holds code where fairseq calls eval() (--adaptive-softmax-cutoff) is refused."""
    marker = tmp_path / 'MARKER'
    state = torch.load(fairseq_run / 'ckpt' / 'checkpoint_last.pt', map_location='cpu', weights_only=True)
    model_cfg = state['cfg']['model']
    assert isinstance(model_cfg, argparse.Namespace)
    model_cfg.rank_scale, model_cfg.wd2fd = None, False  # the dense path, where fairseq builds the adaptive softmax
    model_cfg.adaptive_softmax_cutoff = f"__import__('pathlib').Path({str(marker)!r}).touch() or [4]"
    path = tmp_path / 'in' / 'evil_cfg.pt'
    path.parent.mkdir()
    torch.save(state, path)
    with pytest.raises(Exception) as e:
        FAIRSEQ_READERS[reader](path, fairseq_run)
    assert not marker.exists(), 'the configuration string ran'
    assert isinstance(e.value, ValueError) and '--adaptive-softmax-cutoff' in str(e.value) \
        and 'is not a Python literal' in str(e.value), repr(e.value)


@pytest.mark.parametrize('reader', ['fairseq-generate --path', 'FNLTransformerModel.from_pretrained'])
def test_fairseq_checkpoint_of_another_architecture_cannot_run_code(fairseq_run, reader, tmp_path):
    """The checkpoint's config names fairseq's lstm, whose --decoder-attention fairseq reads with eval()
    (utils.eval_bool), a setting no list of names in the plugin held: refused, the code never runs."""
    from fairseq import options
    marker = tmp_path / 'MARKER'
    state = torch.load(fairseq_run / 'ckpt' / 'checkpoint_last.pt', map_location='cpu', weights_only=True)
    lstm = options.parse_args_and_arch(options.get_training_parser(), input_args=[
        str(fairseq_run / 'bin'), '--arch', 'lstm', '--task', 'translation', '--optimizer', 'adam', '--lr', '0.001'])
    lstm.decoder_attention = f"__import__('pathlib').Path({str(marker)!r}).touch() or '1'"
    state['cfg']['model'] = lstm
    path = tmp_path / 'in' / 'lstm_cfg.pt'
    path.parent.mkdir()
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"^fairseq setting .*__import__.* is not a literal value"):
        FAIRSEQ_READERS[reader](path, fairseq_run)
    assert not marker.exists(), 'the configuration string ran'


def test_fairseq_settings_are_evaluated_as_literals_only(tmp_path):
    """Every loaded fairseq module evaluates setting strings with fnl_fairseq.safe_eval.config_eval: fairseq's
    own defaults (convolution specs with + and *, betas, booleans) keep their values; code, names and
    huge repetitions are refused before anything is evaluated."""
    import sys

    import fairseq.utils
    from fnl_fairseq.safe_eval import MAX_ITEMS, config_eval
    fairseq_modules = [m for n, m in sys.modules.items() if m is not None and n.split('.')[0] == 'fairseq']
    assert len(fairseq_modules) > 50 and all(m.__dict__.get('eval') is config_eval for m in fairseq_modules)
    for text in ('[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2', '[(512, 3)] * 20', '(0.9, 0.98)', 'True',
                 'False', 'None', "{'beam': 5, 'lenpen': -1.5e-1}", '-3', '1 - 2', "('a', b'x', {1, 2})", ' [4] '):
        assert config_eval(text) == eval(text), text
    assert fairseq.utils.eval_str_list('[10, 20]', int) == [10, 20]
    assert fairseq.utils.eval_bool('1') is True and fairseq.utils.eval_bool(None) is False
    with pytest.raises(TypeError, match='must be a string'):
        config_eval(1.0)
    marker = tmp_path / 'MARKER'
    for text in (f"__import__('pathlib').Path({str(marker)!r}).touch()", "open('/etc/passwd')", 'os', 'relu',
                 'a.b', '2 ** 10', 'lambda: 0', '[x for x in (1,)]', '{**{}}', f'[0] * {MAX_ITEMS + 1}', '-"a"',
                 '[1] + (2,)', 'f"{1}"', 'x := 1', '(1,'):
        with pytest.raises(ValueError, match='is not a literal value'):
            config_eval(text)
        with pytest.raises(ValueError, match='is not a literal value'):
            fairseq.utils.eval_str_dict(text)
    assert config_eval(f'[0] * {MAX_ITEMS}') == [0] * MAX_ITEMS
    assert not marker.exists()


def test_fairseq_trained_checkpoint_still_loads(fairseq_run):
    """The wrapped loader leaves good checkpoints alone (generation scores the test set), and fd_adam ran
    with the literal --adam-betas."""
    scorer = _generate(fairseq_run / 'ckpt' / 'checkpoint_last.pt', fairseq_run)
    assert 'BLEU4' in scorer.result_string()
    state = torch.load(fairseq_run / 'ckpt' / 'checkpoint_last.pt', map_location='cpu', weights_only=True)
    assert state['cfg']['optimizer']['adam_betas'] == '(0.9, 0.98)'  # the config as given, only parsed safely
    assert state['last_optimizer_state']['param_groups'][0]['betas'] == [0.9, 0.98]


def test_fd_adam_betas_are_literals(tmp_path):
    """fd_adam reads --adam-betas with ast.literal_eval (fairseq's adam would eval() the string)."""
    marker = tmp_path / 'MARKER'
    assert literal_betas('(0.9, 0.98)') == [0.9, 0.98]
    assert literal_betas([0.8, 0.9]) == [0.8, 0.9]
    code = f"(__import__('pathlib').Path({str(marker)!r}).touch(), 0.9)[1:] * 2"
    with pytest.raises(ValueError, match='--adam-betas must be a pair of numbers'):
        literal_betas(code)
    for bad in ('(0.9,)', '(0.9, 1.5)', "('a', 'b')", '(True, 0.9)'):
        with pytest.raises(ValueError, match='--adam-betas'):
            literal_betas(bad)
    assert not marker.exists()


def test_fd_adam_does_not_eval_adam_betas(tmp_path):
    """Building fd_adam with code as --adam-betas: refused, and the code never runs."""
    from types import SimpleNamespace

    from fairseq import models, optim, options
    from fairseq.data import Dictionary
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    marker = tmp_path / 'MARKER'
    code = f"(__import__('pathlib').Path({str(marker)!r}).touch(), 0.9)[1:] * 2"  # == (0.9, 0.9) under eval
    args = options.parse_args_and_arch(options.get_training_parser(), input_args=[
        '/nonexistent', '--user-dir', USER_DIR, '--arch', 'fnl_transformer_small', '--optimizer', 'fd_adam',
        '--lr', '0.1', '--cpu', '--rank-scale', '0.5', '--wd2fd', '--weight-decay', '0.01', '--adam-betas', code,
        *TINY])
    d = Dictionary()
    for i in range(12):
        d.add_symbol(f'w{i}')
    model = models.build_model(args, SimpleNamespace(source_dictionary=d, target_dictionary=d))
    try:
        optim.build_optimizer(convert_namespace_to_omegaconf(args).optimizer, list(model.parameters()))
        error = None
    except ValueError as e:
        error = str(e)
    assert not marker.exists(), '--adam-betas ran as code'
    assert error is not None and error.startswith('--adam-betas must be a pair of numbers'), error


def test_fairseq_generate_console_refuses_payload(fairseq_run, tmp_path):
    """The issue's reproduction through a real process: non-zero exit, the refusal as the last line, no marker."""
    import subprocess
    import sys
    marker = tmp_path / 'MARKER'
    path = _make_input('payload', tmp_path / 'in', marker, None)
    root = os.path.dirname(USER_DIR)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    out = subprocess.run([sys.executable, '-m', 'fairseq_cli.generate', str(fairseq_run / 'bin'), '--user-dir', USER_DIR,
                          '--path', str(path), '--cpu'], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert "--path '" in last and 'is refused' in last and str(path) in last, out.stderr[-2000:]
    assert not marker.exists(), 'the payload ran'


def test_model_name_that_is_also_a_folder_is_the_timm_name(tmp_path, monkeypatch):
    """``fnl-compress --model fnl`` from the repository root, where the ``fnl/`` package folder exists."""
    from fnl_timm.compress_load import load_model
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'fnl_test_resnet').mkdir()
    model, info = load_model('fnl_test_resnet', random_init=True)
    assert type(model).__name__ == 'CifarResNet' and info['arch'] == 'fnl_test_resnet'
    with pytest.raises(ValueError, match='is a folder'):
        load_model(str(tmp_path / 'fnl_test_resnet'), random_init=True)
