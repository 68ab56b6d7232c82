"""Prompt sources: stable ids, de-duplication, rejects instead of crashes, LMSYS first turns, batching."""

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import prompt_sources
from pipeline.prompt_rows import Prompt, prompt_id
from pipeline.prompts import load_prompts, token_limit
from retrieval_heads.errors import RetmaskError


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def collect(stream):
    return [p for batch in stream for p in batch]


@pytest.fixture(autouse=True)
def hf_cache_in_tmp(tmp_path, monkeypatch):
    """Keep the datasets cache (lock files of streamed loads) out of the user's home."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def test_source_ids_are_kept_and_missing_ids_become_a_content_hash(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl",
                    [{"id": "a1", "prompt": "hello"}, {"prompt": "world"}, {"id": 7, "prompt": "x"}])
    got = collect(load_prompts("jsonl", f))
    assert [p.id for p in got] == ["a1", "sha1-" + hashlib.sha1(b"world").hexdigest()[:16], "7"]
    assert got[1].id == prompt_id("world")
    assert got[0].text == "hello" and got[0].meta["source"] == "jsonl"


def test_ids_are_the_same_on_every_load(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"question {i}"} for i in range(20)])
    ids = [p.id for p in collect(load_prompts("jsonl", f))]
    assert ids == [p.id for p in collect(load_prompts("jsonl", f))]
    # a digest of the text, not Python's hash() (salted per process): the same in every process and on every machine
    assert ids == ["sha1-" + hashlib.sha1(f"question {i}".encode()).hexdigest()[:16] for i in range(20)]


def test_duplicate_ids_keep_the_first_prompt_and_count_as_rejects(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"id": "x", "prompt": "first"}, {"id": "x", "prompt": "second"},
                                           {"prompt": "same"}, {"prompt": "same"}])
    stream = load_prompts("jsonl", f)
    assert [p.text for p in collect(stream)] == ["first", "same"]
    assert stream.reject_counts["duplicate id"] == 2


def test_bad_rows_become_rejects_and_good_rows_still_load(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "good one"},
        {"prompt": ""},
        {"prompt": "   \n"},
        {"prompt": 42},
        {"text": "wrong field"},
        {"prompt": None},
        "{not json",
        "[1, 2]",
        {"prompt": "good two"},
    ])
    stream = load_prompts("jsonl", f)
    assert [p.text for p in collect(stream)] == ["good one", "good two"]
    assert stream.reject_counts == {"empty text": 2, "not a string": 1, "missing field": 2, "invalid JSON": 1,
                                    "not an object": 1}
    assert stream.rejects[0].row == {"prompt": ""}
    invalid = next(r for r in stream.rejects if r.kind == "invalid JSON")
    assert invalid.row["line"] == 7


def test_prompts_arrive_in_batches_of_the_configured_size(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}"} for i in range(7)] + [{"prompt": ""}])
    stream = load_prompts("jsonl", f, batch_size=3)
    assert [len(b) for b in stream] == [3, 3, 1]
    assert stream.num_prompts == 7


def test_stream_is_lazy_so_large_files_are_never_held_whole(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}"} for i in range(10)] + ["{broken"])
    stream = load_prompts("jsonl", f, batch_size=2)
    first = next(iter(stream))
    assert [p.text for p in first] == ["p0", "p1"]
    assert not stream.rejects  # the broken last line has not been read yet


def test_parquet_reads_custom_fields_in_batches(tmp_path):
    table = pa.table({"uid": [f"u{i}" for i in range(10)], "question": [f"q{i}" for i in range(10)],
                      "other": list(range(10))})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=4)
    batches = list(load_prompts("parquet", tmp_path / "p.parquet", batch_size=4, text_field="question", id_field="uid"))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert batches[0][0] == Prompt("u0", "q0", {"source": "parquet"})


def test_a_large_parquet_source_streams_in_memory_of_a_row_group_not_of_the_file(tmp_path):
    import os

    texts = [os.urandom(150).hex() for _ in range(60_000)]  # ~18 MB, incompressible
    pq.write_table(pa.table({"prompt": texts}), tmp_path / "p.parquet", row_group_size=2_000)  # ~0.6 MB each
    base, held, n = pa.total_allocated_bytes(), 0, 0
    for batch in load_prompts("parquet", tmp_path / "p.parquet", batch_size=500, id_field=None):
        n += len(batch)
        held = max(held, pa.total_allocated_bytes() - base)
    assert n == len(texts)
    assert held < 6 << 20, f"Arrow held {held >> 20} MB while streaming an 18 MB file"


def test_parquet_without_id_column_uses_content_hash_and_rejects_nulls(tmp_path):
    pq.write_table(pa.table({"prompt": ["a", None, "b"]}), tmp_path / "p.parquet")
    stream = load_prompts("parquet", tmp_path / "p.parquet")
    assert [p.id for p in collect(stream)] == [prompt_id("a"), prompt_id("b")]
    assert stream.reject_counts == {"missing field": 1}


def test_parquet_without_the_text_column_is_a_user_error_naming_columns(tmp_path):
    pq.write_table(pa.table({"question": ["a"]}), tmp_path / "p.parquet")
    with pytest.raises(RetmaskError, match="no column 'prompt'.*question"):
        collect(load_prompts("parquet", tmp_path / "p.parquet"))


def test_a_directory_reads_every_matching_file_in_name_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "from b"}])
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "from a"}])
    (tmp_path / "notes.txt").write_text("ignored")
    assert [p.text for p in collect(load_prompts("jsonl", tmp_path))] == ["from a", "from b"]


def test_hf_dataset_saved_to_disk_loads_the_requested_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"id": ["t1", "t2"], "prompt": ["train one", "train two"]}),
        "test": datasets.Dataset.from_dict({"id": ["s1"], "prompt": ["test one"]}),
    })
    dd.save_to_disk(str(tmp_path / "ds"))
    assert [p.id for p in collect(load_prompts("hf_dataset", tmp_path / "ds"))] == ["t1", "t2"]
    assert [p.text for p in collect(load_prompts("hf_dataset", tmp_path / "ds", split="test"))] == ["test one"]
    with pytest.raises(RetmaskError, match="no split 'valid'"):
        load_prompts("hf_dataset", tmp_path / "ds", split="valid")


def test_hf_dataset_directory_of_data_files_streams_rows(tmp_path):
    d = tmp_path / "files"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"question": "what is 2+2?"}, {"question": ""}])
    stream = load_prompts("hf_dataset", d, text_field="question")
    assert [p.text for p in collect(stream)] == ["what is 2+2?"]
    assert stream.reject_counts == {"empty text": 1}


LMSYS_ROWS = [
    {"conversation_id": "c1", "model": "vicuna", "language": "English", "redacted": False,
     "conversation": [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "answer"},
                      {"role": "user", "content": "follow-up"}]},
    {"conversation_id": "c2", "redacted": True, "conversation": [{"role": "user", "content": "my name is NAME_1"}]},
    {"conversation_id": "c3", "redacted": False, "conversation": [{"role": "user", "content": "  "}]},
    {"conversation_id": "c4", "redacted": False, "conversation": [{"role": "user", "content": "first question"}]},
    {"conversation_id": "c5", "redacted": False,
     "conversation": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "second prompt"}]},
    {"conversation_id": "c6", "redacted": False, "conversation": []},
    # LMSYS-Chat-1M-Synth flags: the id of the first occurrence, or an empty-instruction marker
    {"conversation_id": "c7", "duplicate_user_instruction_ja": "c1",
     "conversation": [{"role": "user", "content": "dup"}]},
    {"conversation_id": "c8", "empty_user_instruction_ja": True, "conversation": [{"role": "user", "content": "?"}]},
]


def test_lmsys_takes_the_first_user_turn_and_skips_redacted_empty_duplicate_and_flagged(tmp_path):
    f = write_jsonl(tmp_path / "lmsys.jsonl", LMSYS_ROWS)
    stream = load_prompts("lmsys", f)
    got = collect(stream)
    assert [p.text for p in got] == ["first question", "second prompt"]
    assert got[0].id == prompt_id("first question")
    assert got[0].meta == {"source": "lmsys", "conversation_id": "c1", "language": "English", "model": "vicuna"}
    assert stream.reject_counts == {
        "redacted": 1, "empty text": 1, "duplicate id": 1, "no user turn": 1,
        "duplicate_user_instruction_ja": 1, "empty_user_instruction_ja": 1,
    }


def test_lmsys_reads_gzipped_jsonl_as_exported_by_the_synth_recovery_scripts(tmp_path):
    import gzip

    with gzip.open(tmp_path / "lmsys.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in LMSYS_ROWS))
    assert [p.text for p in collect(load_prompts("lmsys", tmp_path))] == ["first question", "second prompt"]


def test_lmsys_reads_parquet_files_with_nested_conversations(tmp_path):
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(LMSYS_ROWS[:3]), tmp_path / "data" / "train-00000.parquet")
    pq.write_table(pa.Table.from_pylist(LMSYS_ROWS[3:6]), tmp_path / "data" / "train-00001.parquet")
    got = collect(load_prompts("lmsys", tmp_path / "data", id_field="conversation_id"))
    # with conversation ids as ids, the repeated text under c4 is a different prompt
    assert [(p.id, p.text) for p in got] == [("c1", "first question"), ("c4", "first question"),
                                             ("c5", "second prompt")]


def test_builtin_source_reads_the_packaged_file_through_importlib_resources(tmp_path, monkeypatch):
    f = write_jsonl(tmp_path / "prompts.jsonl", [{"id": "demo-0001", "prompt": "Name three rivers."}])
    monkeypatch.setattr(prompt_sources, "_builtin_file", lambda: f)
    assert collect(load_prompts("builtin")) == [Prompt("demo-0001", "Name three rivers.", {"source": "builtin"})]


def test_builtin_demo_prompts_ship_with_the_package():
    assert prompt_sources._builtin_file().is_file(), "pipeline/data/prompts.jsonl is missing from the package"
    stream = load_prompts("builtin")
    got = collect(stream)
    assert got and all(p.id.startswith("demo-") for p in got)
    assert not stream.rejects


def test_token_limit_check_rejects_long_prompts(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "short one"}, {"prompt": "this one is far too long"}])
    stream = load_prompts("jsonl", f, checks=[token_limit(lambda s: len(s.split()), 3)])
    assert [p.text for p in collect(stream)] == ["short one"]
    assert stream.rejects[0].reason == "too long: 6 tokens > 3"


def test_skip_ids_drop_committed_prompts_without_counting_them_as_rejects(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": f"q{i}"} for i in range(5)])
    stream = load_prompts("jsonl", f, batch_size=2, skip_ids={"p0", "p3"})
    assert [[p.id for p in b] for b in stream] == [["p1", "p2"], ["p4"]]
    assert stream.num_skipped == 2 and not stream.rejects


def test_unknown_source_is_a_user_error_listing_the_registered_ones():
    with pytest.raises(RetmaskError, match="unknown prompt source 'csv'.*builtin, hf_dataset, jsonl, lmsys, parquet"):
        load_prompts("csv", "x.csv")


def test_missing_file_is_a_user_error_naming_it(tmp_path):
    with pytest.raises(RetmaskError, match="nope.jsonl does not exist"):
        load_prompts("jsonl", tmp_path / "nope.jsonl")


def test_unknown_option_is_a_user_error(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    with pytest.raises(RetmaskError, match="prompt source 'jsonl'.*colour"):
        load_prompts("jsonl", f, colour="red")


def test_a_prompt_stream_is_single_pass(tmp_path):
    stream = load_prompts("jsonl", write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}]))
    assert collect(stream)
    with pytest.raises(RuntimeError, match="single-pass"):
        collect(stream)


# --- undecodable input: one bad line is a reject, a file that cannot be read is a user error ------------------


def gzip_rows(n: int) -> bytes:
    import gzip

    lines = "".join(json.dumps({"prompt": f"question {i} " + "x" * (i % 40)}) + "\n" for i in range(n))
    return gzip.compress(lines.encode())


def one_line_error(path, source="jsonl", match=None):
    with pytest.raises(RetmaskError, match=match) as err:
        collect(load_prompts(source, path))
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    return str(err.value)


def test_a_line_that_is_not_utf8_becomes_a_reject_and_the_lines_after_it_still_load(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_bytes(b'{"prompt": "first"}\n{"prompt": "caf\xe9 au lait"}\n{"prompt": "third"}\n')
    stream = load_prompts("jsonl", f)
    assert [p.text for p in collect(stream)] == ["first", "third"]
    assert stream.reject_counts == {"not UTF-8": 1}
    reject = stream.rejects[0]
    assert reject.reason == "not UTF-8: line 2, byte 16 (invalid continuation byte)"
    assert reject.row == {"file": str(f), "line": 2, "text": '{"prompt": "caf\\xe9 au lait"}\n'}
    json.dumps(reject.row)  # rejects.jsonl must be able to hold it


def test_a_file_none_of_whose_lines_is_utf8_is_a_user_error_naming_it(tmp_path):
    f = tmp_path / "latin1.jsonl"
    f.write_bytes('{"prompt": "café"}\n\n{"prompt": "crème"}\n'.encode("latin-1"))
    assert "none of its 2 lines is UTF-8; convert it to UTF-8" in one_line_error(f)


def test_a_utf8_byte_order_mark_is_not_a_reject(tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"prompt": "first"}\n{"prompt": "second"}\n')
    stream = load_prompts("jsonl", f)
    assert [p.text for p in collect(stream)] == ["first", "second"] and not stream.rejects


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_a_broken_gzip_stream_is_a_user_error_naming_the_file_and_the_last_good_line(tmp_path, damage):
    # nothing after the break can be decompressed, so the file is unusable rather than one line bad
    data = bytearray(gzip_rows(3000))
    mid = len(data) // 2
    if damage == "truncated":
        data = data[:mid]
    else:
        data[mid:mid + 50] = bytes(b ^ 0x55 for b in data[mid:mid + 50])
    f = tmp_path / "p.jsonl.gz"
    f.write_bytes(bytes(data))
    one_line_error(f, match=r"is a broken gzip stream after line \d+ \(.+\); re-download or re-compress it")


@pytest.mark.parametrize("name, content, match", [
    ("plain.jsonl.gz", b'{"prompt": "a"}\n', "is not gzip-compressed .*rename it to .jsonl"),
    ("packed.jsonl", None, "is gzip-compressed; name it .jsonl.gz"),
    ("utf16.jsonl", '{"prompt": "a"}\n'.encode("utf-16"), "is UTF-16 text; convert it to UTF-8"),
    ("binary.jsonl", b"\x00\x01\x02garbage\n", "binary, not JSON lines text"),
])
def test_a_jsonl_file_that_is_not_jsonl_text_is_a_user_error(tmp_path, name, content, match):
    f = tmp_path / name
    f.write_bytes(gzip_rows(3) if content is None else content)
    one_line_error(f, match=match)


def test_a_parquet_file_given_to_the_jsonl_source_points_at_the_parquet_source(tmp_path):
    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "p.parquet")
    one_line_error(tmp_path / "p.parquet", match="is a Parquet file; use the parquet source")


@pytest.mark.parametrize("name", ["p.parquet", "p.jsonl"])
def test_a_file_that_is_not_parquet_given_to_the_parquet_source_is_a_user_error(tmp_path, name):
    # read as Parquet whatever its name: the source says the format, the suffix does not
    f = write_jsonl(tmp_path / name, [{"prompt": "a"}])
    one_line_error(f, "parquet", match="is not a readable Parquet file .*; give a Parquet file, or the jsonl source")


def test_a_damaged_parquet_file_is_a_user_error_naming_the_last_good_row(tmp_path):
    f = tmp_path / "p.parquet"
    table = pa.table({"prompt": [f"q{i} " * 20 for i in range(5000)]})
    pq.write_table(table, f, row_group_size=500, compression="snappy")
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 200] = bytes(b ^ 0x55 for b in data[mid:mid + 200])
    f.write_bytes(bytes(data))
    one_line_error(f, "parquet", match=r"is damaged after row \d+ .*; re-export or re-download it")


def test_a_directory_without_matching_files_says_which_source_reads_what_it_holds(tmp_path):
    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "p.parquet")
    with pytest.raises(RetmaskError, match="is a directory with no .jsonl/.jsonl.gz files; it holds parquet files: "
                                           "use the parquet source"):
        load_prompts("jsonl", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RetmaskError, match="no .parquet files; give a file or a directory"):
        load_prompts("parquet", tmp_path / "empty")


def test_a_path_that_is_neither_file_nor_directory_is_a_user_error(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(RetmaskError, match="pipe.jsonl is neither a file nor a directory"):
        load_prompts("jsonl", tmp_path / "pipe.jsonl")


def test_an_undecodable_data_file_of_a_streamed_hf_dataset_is_a_user_error(tmp_path):
    d = tmp_path / "files"
    d.mkdir()
    (d / "train.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(RetmaskError, match=r"cannot read dataset .*files after row 0 \(UnicodeDecodeError"):
        collect(load_prompts("hf_dataset", d))


# --- repeats: each prompt used N times under distinct ids (docs/STUDY.md uses every built-in prompt twice) -----


def _two_rows_of(source, tmp_path, monkeypatch):
    """A source of that format holding the prompts ("a", "alpha") and ("b", "beta"), with the options to read it."""
    rows = [{"id": "a", "prompt": "alpha"}, {"id": "b", "prompt": "beta"}]
    if source == "builtin":
        monkeypatch.setattr(prompt_sources, "_builtin_file", lambda: write_jsonl(tmp_path / "prompts.jsonl", rows))
        return None, {}
    if source == "jsonl":
        return write_jsonl(tmp_path / "p.jsonl", rows), {}
    if source == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
        return tmp_path / "p.parquet", {}
    if source == "hf_dataset":
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
        return tmp_path / "ds", {}
    lmsys = [{"conversation_id": r["id"], "conversation": [{"role": "user", "content": r["prompt"]}]} for r in rows]
    return write_jsonl(tmp_path / "lmsys.jsonl", lmsys), {"id_field": "conversation_id"}


def test_repeats_yield_each_prompt_under_distinct_ids_with_distinct_seeds(tmp_path):
    from pipeline.generate import prompt_seed

    f = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "alpha"}, {"id": "b", "prompt": "beta"}])
    stream = load_prompts("jsonl", f, batch_size=2, repeats=3)
    batches = list(stream)
    got = [p for batch in batches for p in batch]
    # in a row, the first copy under the source id; batches may split a prompt's copies
    assert [[p.id for p in b] for b in batches] == [["a", "a~1"], ["a~2", "b"], ["b~1", "b~2"]]
    assert [p.text for p in got] == ["alpha"] * 3 + ["beta"] * 3
    assert len({prompt_seed(0, p.id) for p in got}) == 6  # the copies sample independently
    assert not stream.rejects  # the copies are not duplicates
    assert (stream.num_rows, stream.num_prompts) == (2, 6)


@pytest.mark.parametrize("source", ["builtin", "jsonl", "parquet", "hf_dataset", "lmsys"])
def test_repeats_work_the_same_for_every_source(source, tmp_path, monkeypatch):
    path, options = _two_rows_of(source, tmp_path, monkeypatch)
    got = collect(load_prompts(source, path, repeats=2, **options))
    assert [(p.id, p.text) for p in got] == [("a", "alpha"), ("a~1", "alpha"), ("b", "beta"), ("b~1", "beta")]


def test_repeats_one_is_the_default_and_changes_nothing(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "alpha"}, {"id": "b", "prompt": "beta"}])
    assert collect(load_prompts("jsonl", f, repeats=1)) == collect(load_prompts("jsonl", f))
    assert [p.id for p in collect(load_prompts("jsonl", f))] == ["a", "b"]


def test_repeats_count_toward_max_prompts(tmp_path):
    from pipeline.generate import _limited, _Rejects, prompt_seed

    f = write_jsonl(tmp_path / "p.jsonl", [{"id": p, "prompt": p * 3} for p in "abc"])
    stream = load_prompts("jsonl", f, batch_size=2, repeats=2)
    # what generate sends to the engines under max_prompts 3: instances, copies included
    sent = [row for batch in _limited(stream, 3, _Rejects(None, False), 0) for row in batch]
    assert sent == [("a", "aaa", prompt_seed(0, "a")), ("a~1", "aaa", prompt_seed(0, "a~1")),
                    ("b", "bbb", prompt_seed(0, "b"))]


def test_repeats_resume_skips_exactly_the_committed_copies(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"id": p, "prompt": p} for p in "abc"])
    stream = load_prompts("jsonl", f, repeats=2, skip_ids={"a", "a~1", "b"})
    assert [p.id for p in collect(stream)] == ["b~1", "c", "c~1"]
    assert stream.num_skipped == 3 and not stream.rejects


def test_a_rejected_row_is_counted_once_and_yields_no_copies(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "prompt": "short"}, {"id": "b", "prompt": "this one is far too long"}, {"id": "c", "prompt": ""},
        {"id": "a", "prompt": "same id again"}, {"id": "a~1", "prompt": "an id a copy already has"},
    ])
    stream = load_prompts("jsonl", f, repeats=3, checks=[token_limit(lambda s: len(s.split()), 3)])
    assert [p.id for p in collect(stream)] == ["a", "a~1", "a~2"]
    assert stream.reject_counts == {"too long": 1, "empty text": 1, "duplicate id": 2}
    assert [r.reason for r in stream.rejects if r.kind == "duplicate id"] == ["duplicate id: a", "duplicate id: a~1"]
    assert stream.num_rows == 5


@pytest.mark.parametrize("bad", [0, -2, "2", 1.5, 2.0, True, None, [2]])
def test_a_bad_repeats_value_is_one_line_error(bad, tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    with pytest.raises(RetmaskError, match=r"^prompt_options\.repeats must be a whole number >= 1") as err:
        load_prompts("jsonl", f, repeats=bad)
    assert "\n" not in str(err.value) and repr(bad) in str(err.value)


def test_plan_counts_each_row_once_and_every_prompt_instance(tmp_path):
    """`retmask plan` reports source rows and usable prompt instances, as generate and max_prompts count them."""
    from support import REPO

    from pipeline.generate import GenerateConfig
    from pipeline.plan import format_plan, plan

    f = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "alpha"}, {"id": "b", "prompt": "beta"}, "{bad"])
    config = GenerateConfig(model=str(REPO / "tests" / "data" / "configs" / "Llama-3.1-8B-Instruct"),
                            variants=["normal"], prompts_source="jsonl", prompts=str(f),
                            prompt_options={"repeats": 2}, out=str(tmp_path / "out"))
    report = plan(config)
    assert (report.values["rows"], report.values["usable"]) == (3, 4)
    assert report.values["rejects"] == {"invalid JSON": 1}
    assert "usable prompts: 4 (2 uses of each valid row: prompt_options.repeats)" in format_plan(report)
    config.prompt_options = {"repeats": 0}
    assert any(p.startswith("prompt source: prompt_options.repeats must be") for p in plan(config).problems)
