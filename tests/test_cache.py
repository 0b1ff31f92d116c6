"""The sysfs cache probe that sizes the CPU backend's channel blocks."""

from batchnorm._cache import cache_level


def _entry(root, name, **files):
    d = root / name
    d.mkdir()
    for key, value in files.items():
        (d / key).write_text(value + "\n")


def test_levels_types_and_shared_lists(tmp_path):
    _entry(tmp_path, "index0", level="1", type="Data", size="32K", shared_cpu_list="0")
    _entry(tmp_path, "index1", level="1", type="Instruction", size="32K",
           shared_cpu_list="0")
    _entry(tmp_path, "index2", level="2", type="Unified", size="1024K", shared_cpu_list="0")
    _entry(tmp_path, "index3", level="3", type="Unified", size="32M",
           shared_cpu_list="0-3,8-11")
    assert cache_level(1, str(tmp_path)) == (32 << 10, 1)
    assert cache_level(2, str(tmp_path)) == (1 << 20, 1)
    assert cache_level(3, str(tmp_path)) == (32 << 20, 8)
    assert cache_level(4, str(tmp_path)) is None


def test_odd_entries_are_skipped(tmp_path):
    # a garbled entry, then one without a shared list, then a good one at the same level
    _entry(tmp_path, "index0", level="3", type="Unified", size="lots", shared_cpu_list="0")
    _entry(tmp_path, "index1", level="3", type="Unified", size="8M")
    _entry(tmp_path, "index2", level="3", type="Unified", size="16384K", shared_cpu_list="0,1")
    assert cache_level(3, str(tmp_path)) == (16 << 20, 2)


def test_no_sysfs(tmp_path):
    assert cache_level(2, str(tmp_path / "absent")) is None
