"""Code, help texts and docs point at docs/ or the paper, never at a document outside the repository."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# "SPEC 3", "SPEC sections 1-3", "SPEC.md": the behavioural notes the project was built from are not shipped
PATTERN = re.compile(r'\bSPEC(\.md|\s+(\d|sections?\b))')


def test_no_spec_citations():
    hits = []
    for folder in ('fnl', 'fnl_timm', 'fnl_fairseq', 'recipes', 'bench', 'tests', 'docs'):
        for path in sorted((ROOT / folder).rglob('*')):
            if path.suffix in ('.py', '.md', '.sh', '.txt') and path.is_file():
                for n, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1):
                    if PATTERN.search(line) and path.name != 'test_no_external_refs.py':
                        hits.append(f'{path.relative_to(ROOT)}:{n}: {line.strip()}')
    for path in (ROOT / 'README.md',):
        for n, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1):
            if PATTERN.search(line):
                hits.append(f'README.md:{n}: {line.strip()}')
    assert not hits, '\n'.join(hits)
