"""A file written through retrieval_heads.files is the old one or the whole new one, never torn."""

import pytest

from retrieval_heads.files import write_atomically, write_text_atomically


def test_a_write_replaces_the_file_whole_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "new" / "scores.json"  # the folder is made
    write_text_atomically(target, "first\n")
    write_text_atomically(target, "second\n")
    assert target.read_text() == "second\n"
    assert [p.name for p in target.parent.iterdir()] == ["scores.json"]


def test_the_writer_gets_a_temporary_path_with_the_targets_suffix(tmp_path):
    seen = []
    write_atomically(tmp_path / "plot.png", lambda tmp: (seen.append(tmp), tmp.write_bytes(b"png")))
    assert seen[0].suffix == ".png" and seen[0] != tmp_path / "plot.png"  # matplotlib picks the format from it
    assert (tmp_path / "plot.png").read_bytes() == b"png"


def test_a_failed_write_keeps_the_old_file_and_removes_its_half(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old\n")

    def torn(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomically(target, torn)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
