"""Every command line explains itself: each option of every console script, recipe and benchmark
has a help text, no help text shows its default twice, and no description stops mid-sentence.

Parsers come from each program's ``build_parser()``; the benchmarks, whose ``main()`` builds the
parser inline, are run with ``parse_args`` intercepted, so nothing is executed.
"""
import argparse
import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / 'recipes'

# (program, how to get its parser)
BUILT = {
    'fnl-train': ('fnl_timm.train', 'build_parser'),
    'fnl-compress': ('fnl_timm.compress', 'build_parser'),
    'fnl-demo': ('fnl_timm.demo', 'build_parser'),
    'fnl-fairseq-train': ('fnl_fairseq.launch', 'build_parser'),
}
RECIPE_FILES = sorted(p for p in RECIPES.glob('*.py') if not p.name.startswith('_'))
RECIPE_FILES.append(RECIPES / 'iwslt14' / 'iwslt14.py')
BENCH_FILES = sorted(p for p in (ROOT / 'bench').glob('*.py') if p.name.startswith(('bench_', 'profile_')))

DEFAULT_SHOWN = re.compile(r'\(default\b|\bdefault:', re.IGNORECASE)


def _load_file(path: Path):
    sys.path.insert(0, str(path.parent))  # recipes import their _common
    try:
        spec = importlib.util.spec_from_file_location(f'_help_{path.stem}', path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(path.parent))


class _Captured(Exception):
    def __init__(self, parser):
        super().__init__()
        self.parser = parser


def _intercepted_parser(main, monkeypatch) -> argparse.ArgumentParser:
    """The parser ``main()`` builds, taken at its ``parse_args`` call (nothing runs)."""
    def capture(self, *args, **kwargs):
        raise _Captured(self)
    monkeypatch.setattr(argparse.ArgumentParser, 'parse_args', capture)
    monkeypatch.setattr(argparse.ArgumentParser, 'parse_known_args', capture)
    monkeypatch.setattr(sys, 'argv', ['prog'])
    try:
        main()
    except _Captured as c:
        return c.parser
    raise AssertionError('main() returned without parsing its arguments')


def _parser(kind: str, name: str, monkeypatch) -> argparse.ArgumentParser:
    if kind == 'console':
        module, attr = BUILT[name]
        if module.startswith('fnl_fairseq'):
            pytest.importorskip('fairseq')
        return getattr(importlib.import_module(module), attr)()
    path = ROOT / name
    if kind == 'recipe':
        return _load_file(path).build_parser()
    if path.name == 'bench_fairseq.py':
        pytest.importorskip('fairseq')
    return _intercepted_parser(_load_file(path).main, monkeypatch)


def _actions(parser: argparse.ArgumentParser):
    """Every action of the parser and of its sub-command parsers, with the parser that formats it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)
        else:
            yield parser, action


def _problems(parser: argparse.ArgumentParser) -> list:
    problems = []
    for owner, action in _actions(parser):
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        label = '/'.join(action.option_strings) or action.dest
        if not (action.help or '').strip():
            problems.append(f'{label}: no help')
            continue
        shown = owner._get_formatter()._expand_help(action)  # the text --help prints, defaults included
        if len(DEFAULT_SHOWN.findall(shown)) > 1:
            problems.append(f'{label}: default shown twice: {shown!r}')
    if parser.description:  # its first paragraph is a whole sentence
        first = parser.description.strip().split('\n\n')[0].rstrip()
        if not first.endswith(('.', ':', '!', '?', ')')):
            problems.append(f'description stops mid-sentence: {first[-60:]!r}')
    return problems


PROGRAMS = ([('console', n) for n in BUILT] + [('recipe', str(p.relative_to(ROOT))) for p in RECIPE_FILES]
            + [('bench', str(p.relative_to(ROOT))) for p in BENCH_FILES])


def test_every_program_is_listed():
    assert len(RECIPE_FILES) >= 8 and len(BENCH_FILES) >= 5


@pytest.mark.parametrize('kind,name', PROGRAMS, ids=[n for _, n in PROGRAMS])
def test_every_option_has_help(kind, name, monkeypatch):
    parser = _parser(kind, name, monkeypatch)
    options = [a for _, a in _actions(parser) if not isinstance(a, argparse._HelpAction)]
    assert options, 'no options found: the parser was not the program\'s'
    problems = _problems(parser)
    assert not problems, '\n'.join(problems)


def test_checks_catch_the_faults():
    """The checks themselves: a missing help, a default shown twice, a description cut short."""
    p = argparse.ArgumentParser(description='Trains with spectral init and',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--lr', type=float, default=0.1)
    p.add_argument('--classes', type=int, default=None, help='number of classes (default: the dataset\'s)')
    p.add_argument('--epochs', type=int, default=200, help='epochs')
    problems = _problems(p)
    assert problems == ['--lr: no help', f'--classes: default shown twice: '
                        f'"number of classes (default: the dataset\'s) (default: None)"',
                        "description stops mid-sentence: 'Trains with spectral init and'"], problems


def test_launcher_help_is_its_own(capsys, monkeypatch):
    """``fnl-fairseq-train --help`` explains the launcher (fairseq-train's options: ``-- --help``)
    instead of starting worker processes to print fairseq-train's help."""
    pytest.importorskip('fairseq')
    from fnl_fairseq import launch
    monkeypatch.setattr(launch.subprocess, 'call', lambda *a, **k: pytest.fail(f'started processes: {a}'))
    with pytest.raises(SystemExit) as e:
        launch.main(['--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith('usage: fnl-fairseq-train [--nproc-per-node N] --') and "'-- --help'" in out


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def test_doc_links_resolve():
    """Every ``docs/<page>.md#section`` that the code, help texts, READMEs and docs point at exists."""
    docs = ROOT / 'docs'
    anchors = {p.name: {_slug(line.lstrip('#')) for line in p.read_text().splitlines() if line.startswith('#')}
               for p in docs.glob('*.md')}
    assert {'README.md', 'method.md', 'experiments.md', 'differences.md'} <= set(anchors)
    link = re.compile(r'(?:docs/|\()([a-z]+\.md)(?:#([\w\-]+))?')
    sources = [p for d in ('fnl', 'fnl_timm', 'fnl_fairseq', 'recipes', 'bench', 'tests', 'docs')
               for p in (ROOT / d).rglob('*') if p.suffix in ('.py', '.md')] + [ROOT / 'README.md']
    broken = []
    for path in sources:
        text = path.read_text(encoding='utf-8')
        for page, anchor in link.findall(text):
            if 'docs/' + page not in text and path.parent != docs:
                continue  # a link to some other page of the same name
            if page not in anchors or (anchor and anchor not in anchors[page]):
                broken.append(f'{path.relative_to(ROOT)}: {page}#{anchor}')
    assert not broken, '\n'.join(broken)


def test_no_parser_is_missed():
    """A new command line in the packages must be added to BUILT above (its parser is walked there)."""
    walked = {'fnl_timm/compress.py', 'fnl_timm/demo.py', 'fnl_timm/train_args.py', 'fnl_fairseq/launch.py'}
    found = {str(p.relative_to(ROOT)).replace('\\', '/') for d in ('fnl', 'fnl_timm', 'fnl_fairseq')
             for p in (ROOT / d).rglob('*.py') if 'ArgumentParser(' in p.read_text(encoding='utf-8')}
    assert found <= walked, sorted(found - walked)
