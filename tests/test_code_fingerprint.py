"""The code part of every stage key: a change to the package's code misses, a change to the reporting code does not."""
from hps_exp import cache


def test_reporting_code_is_not_part_of_the_stage_keys(tmp_path, monkeypatch):
    pkg = tmp_path / "hps_exp"
    for rel in ("stages.py", "tables/render.py", "sweep/runner.py", "tune.py", "data/chat.py"):
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text("x = 1\n")
    monkeypatch.setattr(cache, "PACKAGE", pkg)

    def fingerprint():
        cache.code_fingerprint.cache_clear()
        return cache.code_fingerprint()

    base = fingerprint()
    for rel in ("tables/render.py", "sweep/runner.py", "tune.py"):
        (pkg / rel).write_text("x = 2\n")
        assert fingerprint() == base, rel
    for rel in ("stages.py", "data/chat.py"):
        (pkg / rel).write_text("x = 2\n")
        assert fingerprint() != base, rel
        base = fingerprint()
    cache.code_fingerprint.cache_clear()
