"""hps_exp.io's writers: whole files and directories only, with the permissions a plain open() / mkdir() gives."""
import os

from hps_exp.io import atomic_write_bytes, fresh_dir, publish_dir, publish_new_dir


def test_atomic_bytes_get_ordinary_permissions_and_leave_no_temp(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.png", b"\x89PNG")
        atomic_write_bytes(tmp_path / "a.png", b"\x89PNG2")   # over an existing file
        made = fresh_dir(tmp_path / "d")
    finally:
        os.umask(old)
    assert (tmp_path / "a.png").read_bytes() == b"\x89PNG2"
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == 0o644 and made.stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "d"]


def test_publish_dir_replaces_the_old_directory_whole(tmp_path):
    final = tmp_path / "policy"
    for content in ("one", "two"):
        tmp = fresh_dir(tmp_path / ".policy.tmp")
        (tmp / "w.txt").write_text(content)
        publish_dir(tmp, final, aside=tmp_path / "policy.old")
    assert (final / "w.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]


def test_publish_new_dir_keeps_what_was_published_first(tmp_path):
    final = tmp_path / "entry"
    first, second = fresh_dir(tmp_path / ".a"), fresh_dir(tmp_path / ".b")
    (first / "x").write_text("first")
    (second / "x").write_text("second")
    (second / "y").write_text("second")
    assert publish_new_dir(first, final) is True
    assert publish_new_dir(second, final) is False and second.is_dir()
    assert (final / "x").read_text() == "first"
