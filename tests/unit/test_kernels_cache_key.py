"""The native kernels' cache key names the CPU on every architecture (a `-march=native` build must
never be loaded by another CPU from a shared cache)."""
from rtserve.kernels import _cpu_flags

_ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: {part}
CPU revision\t: 1

processor\t: 1
Features\t: fp asimd
CPU part\t: 0xfff
"""


def test_aarch64_cpus_that_differ_only_in_their_part_get_different_keys(tmp_path):
    keys = []
    for part in ("0xd0c", "0xd40"):  # Neoverse N1, Neoverse V1: same features line prefix
        path = tmp_path / f"cpuinfo-{part}"
        path.write_text(_ARM.format(part=part))
        keys.append(_cpu_flags(str(path)))
    assert keys[0] != keys[1]
    assert "Features\t: fp asimd evtstrm" in keys[0] and "CPU part\t: 0xd0c" in keys[0]
    assert "0xfff" not in keys[0]  # the first processor's lines only


def test_x86_key_holds_the_flags_line_and_the_torch_capability(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 avx512f\n")
    key = _cpu_flags(str(path))
    assert "flags\t\t: fpu sse2 avx2 avx512f" in key and "model name\t: Some CPU" in key
    assert _cpu_flags(str(tmp_path / "missing")) != key  # no cpuinfo: machine and capability only
