"""fnl.cache_cpu_allocations: large CPU tensors reuse mapped memory instead of page-faulting it in again.

Checked by counting the process's minor page faults (not by timing), in a child process so the
process-wide allocator setting does not leak into the other tests.
"""
import os
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import resource, torch, fnl
    n = 16 * 2 ** 20  # 64 MB of float32: above glibc's largest mmap threshold (32 MiB)

    def faults():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            torch.empty(n).fill_(1.0)  # allocate, touch every page, free
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    pages = n * 4 // resource.getpagesize()
    default = faults()
    fnl.cache_cpu_allocations()
    faults()  # the first rounds map the memory: after one round, one block in about a third of processes
    faults()  # still lands on fresh heap pages (it depends on the heap's layout); after two, none did in 10 runs
    cached = faults()
    fnl.cache_cpu_allocations(False)
    print(pages, default, cached)
""")


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt')
@pytest.mark.skipif(any(a in os.environ.get('LD_PRELOAD', '') for a in ('jemalloc', 'tcmalloc')),
                    reason='a caching allocator is preloaded instead of glibc malloc')
def test_cache_cpu_allocations_stops_page_faults():
    out = subprocess.run([sys.executable, '-c', CHILD], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    pages, default, cached = map(int, out.stdout.split())
    assert default >= 3 * pages * 0.9, (pages, default)  # glibc: a fresh mmap per tensor, every page faulted in
    assert cached < 0.05 * pages, (pages, cached)  # cached: the pages stay mapped and are reused


def test_cache_cpu_allocations_without_glibc_says_what_to_use(monkeypatch):
    import fnl
    from fnl import runtime
    monkeypatch.setattr(runtime, '_libc', lambda: None)
    with pytest.raises(RuntimeError, match='jemalloc or tcmalloc'):
        fnl.cache_cpu_allocations()
    assert not fnl.cpu_allocations_cached()
