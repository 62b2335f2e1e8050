import os
import subprocess
import sys
import textwrap

import pytest

from lightning_quantum.compiled import _load_marker, _remembering


class _Probe:
    """Stands in for Inductor's ``VecISA._probe_load``: counts its calls and answers ``loads``."""

    def __init__(self, loads: bool) -> None:
        self.loads = loads
        self.calls = 0

    def __call__(self, isa, library: str) -> bool:
        self.calls += 1
        return self.loads


def test_a_probe_load_that_passed_is_remembered_beside_its_library(tmp_path):
    library = tmp_path / "probe.so"
    library.write_bytes(b"\x7fELF")
    original = _Probe(loads=True)
    probe = _remembering(original)
    assert probe(None, str(library)) is True
    assert original.calls == 1
    assert _load_marker(str(library)).exists()
    assert probe(None, str(library)) is True
    assert original.calls == 1  # answered from the marker
    # a library built again after the marker is probed again
    os.utime(library, (library.stat().st_atime, _load_marker(str(library)).stat().st_mtime + 10))
    assert probe(None, str(library)) is True
    assert original.calls == 2


def test_a_failed_probe_load_is_not_remembered(tmp_path):
    library = tmp_path / "probe.so"
    library.write_bytes(b"\x7fELF")
    original = _Probe(loads=False)
    probe = _remembering(original)
    assert probe(None, str(library)) is False
    assert probe(None, str(library)) is False
    assert original.calls == 2
    assert not _load_marker(str(library)).exists()


def test_the_marker_names_this_host_python_and_torch(tmp_path, monkeypatch):
    library = str(tmp_path / "probe.so")
    here = _load_marker(library)
    assert here.parent == tmp_path and here.name.startswith("probe.so.loads-")
    monkeypatch.setattr("platform.node", lambda: "another-host")
    assert _load_marker(library) != here


@pytest.mark.slow
def test_a_second_process_checks_the_instruction_sets_without_loading_probes_in_children():
    """Inductor's own probe, twice in fresh processes: the second loads no probe library in a child process and
    picks the same instruction set (fails if torch stops calling ``VecISA._probe_load``, which the markers
    stand in for)."""
    script = textwrap.dedent(
        """
        import subprocess
        from torch._inductor import cpu_vec_isa
        from lightning_quantum.compiled import _check_cpu_isa

        loads = []  # the children that load a probe library (others ask the compiler its version)
        run = subprocess.run
        def counted(command, *args, **kwargs):
            loads.extend("LoadLibrary" in part for part in command)
            return run(command, *args, **kwargs)
        subprocess.run = counted
        _check_cpu_isa()
        subprocess.run = run
        print(sum(loads), cpu_vec_isa.pick_vec_isa())
        """
    )
    command = [sys.executable, "-c", script]
    first, second = (subprocess.run(command, capture_output=True, text=True, check=True).stdout for _ in range(2))
    first, second = first.split(maxsplit=1), second.split(maxsplit=1)
    assert second[0] == "0"
    assert second[1] == first[1]
