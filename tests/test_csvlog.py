"""The CSV mirror: exact text, quoting, formula cells, header once, rotation by size and day, pruning, no mixing."""

from __future__ import annotations

import csv
import io
import multiprocessing
import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from proxy_app.calls import COLUMNS, Call
from proxy_app.dashboard import filters, queries
from proxy_app.store import export, models, schema, writes
from proxy_app.store.csvlog import HEADER, CsvLog, iter_csv

NOW = datetime(2025, 5, 1, 12, 30, 45, 123456, tzinfo=UTC)


def sample_call(**changes) -> Call:
    """A finished streamed /api/chat call with every field known; ``changes`` overrides fields."""
    call = Call(
        timestamp=NOW, request_id="0f1e2d3c4b5a69788796a5b4c3d2e1f0", ip_source="192.0.2.7",
        user_agent="ollama-python/0.6.3", http_method="POST", endpoint="/api/chat", session_id="s-1",
        model="llama3.2", input_tokens=12, output_tokens=5, total_tokens=17,
        model_parameters='{"temperature":0.2,"num_ctx":4096}', stream_mode=True, request_size_bytes=120,
        response_size_bytes=1043, queue_time_ms=0.0, processing_time_ms=250.5, total_time_ms=251.25,
        http_status=200, error_message=None, system_load_cpu=12.5, system_load_memory=40.0,
        concurrent_requests=3, outcome="completed", ttft_ms=12.75, tokens_per_second=20.0, load_duration_ms=1.0,
        prompt_eval_duration_ms=12.0, eval_duration_ms=250.0, done_reason="stop", api="native",
        prompt='say "hi", then\nstop', response_preview="The sky is blue.", cached_input_tokens=8, remote_model=None,
        remote_host=None,
        cold_start=False, key_name="team-a", instance="gpu-1", upstream="http://127.0.0.1:11435",
    )  # fmt: skip
    return replace(call, **changes)


def parse(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


def test_csvlog_known_call_whole_text(tmp_path):
    log = CsvLog(tmp_path / "calls.csv", clock=lambda: NOW)
    unknown = sample_call(input_tokens=None, output_tokens=None, total_tokens=None, stream_mode=False,
                          error_message='boom, "quoted"', prompt=None)  # fmt: skip
    log.append([sample_call(), unknown])
    expected = (
        "timestamp,request_id,ip_source,user_agent,http_method,endpoint,session_id,model,input_tokens,output_tokens,"
        "total_tokens,model_parameters,stream_mode,request_size_bytes,response_size_bytes,queue_time_ms,"
        "processing_time_ms,total_time_ms,http_status,error_message,system_load_cpu,system_load_memory,"
        "concurrent_requests,outcome,ttft_ms,tokens_per_second,load_duration_ms,prompt_eval_duration_ms,"
        "eval_duration_ms,done_reason,api,prompt,response_preview,cached_input_tokens,remote_model,remote_host,"
        "cold_start,key_name,instance,upstream\r\n"
        "2025-05-01T12:30:45.123Z,0f1e2d3c4b5a69788796a5b4c3d2e1f0,192.0.2.7,ollama-python/0.6.3,POST,/api/chat,s-1,"
        'llama3.2,12,5,17,"{""temperature"":0.2,""num_ctx"":4096}",true,120,1043,0.0,250.5,251.25,200,,12.5,40.0,3,'
        'completed,12.75,20.0,1.0,12.0,250.0,stop,native,"say ""hi"", then\nstop",The sky is blue.,8,,,false,team-a,'
        "gpu-1,http://127.0.0.1:11435\r\n"
        "2025-05-01T12:30:45.123Z,0f1e2d3c4b5a69788796a5b4c3d2e1f0,192.0.2.7,ollama-python/0.6.3,POST,/api/chat,s-1,"
        'llama3.2,,,,"{""temperature"":0.2,""num_ctx"":4096}",false,120,1043,0.0,250.5,251.25,200,"boom, ""quoted""",'
        "12.5,40.0,3,completed,12.75,20.0,1.0,12.0,250.0,stop,native,,The sky is blue.,8,,,false,team-a,gpu-1,"
        "http://127.0.0.1:11435\r\n"
    )
    assert (tmp_path / "calls.csv").read_bytes().decode() == expected
    rows = parse((tmp_path / "calls.csv").read_text())
    assert rows[0] == list(COLUMNS) and len(rows) == 3 and all(len(row) == len(COLUMNS) for row in rows)
    assert rows[1][COLUMNS.index("prompt")] == 'say "hi", then\nstop'


@pytest.mark.parametrize("text", ["=HYPERLINK(1)", "+1", "-2+3", "@SUM(A1)", "\tx", "\rx"])
def test_csvlog_formula_cells_neutralised(text):
    line = list(iter_csv([sample_call(user_agent=text, prompt=text, key_name=text)]))[1]
    row = parse(line)[0]
    assert row[COLUMNS.index("user_agent")] == "'" + text
    assert row[COLUMNS.index("prompt")] == "'" + text
    assert row[COLUMNS.index("key_name")] == "'" + text


# Each of these is read as a formula by some spreadsheet: one that skips leading spaces, line breaks or invisible
# characters before looking for "=", or one that takes the full-width signs for the ASCII ones.
HIDDEN_FORMULAS = [
    " =1+1", "   +1", "\n=1+1", "\r\n-1", " \n\t@SUM(A1)", "\u200b=1+1", "\ufeff=1+1", "\u200c=1", "\u200d+1",
    "\u2060@x", "\u00a0=1", "\u3000=1", "\uff1d1+1", "\uff0b1", "\uff0d1", "\uff20SUM(A1)", " \u200b\uff1d1",
    "\t", "\r",
]  # fmt: skip


@pytest.mark.parametrize("text", HIDDEN_FORMULAS)
def test_csvlog_hidden_formula_cells_neutralised_in_mirror_and_export(tmp_path, text):
    call = sample_call(user_agent=text, prompt=text, error_message=text)
    log = CsvLog(tmp_path / "calls.csv", clock=lambda: NOW)
    log.append([call])
    with open(log.path, newline="", encoding="utf-8") as handle:
        mirrored = handle.read()
    row = parse(mirrored)[1]
    for name in ("user_agent", "prompt", "error_message"):
        assert row[COLUMNS.index(name)] == "'" + text, name
    db = models.open_database(f"sqlite:///{tmp_path / 'calls.db'}")
    schema.create_tables(db)
    writes.insert_calls(db, [call])
    assert "".join(export.iter_csv(queries.iter_chunks(db, filters.parse_filters({"since": "all"})))) == mirrored


@pytest.mark.parametrize("text", [" x", "\nplain", "\u200bword", "\uff21=1", "a=b", "5 apples", "\u00a0"])
def test_csvlog_text_that_is_no_formula_untouched(text):
    row = parse(list(iter_csv([sample_call(user_agent=text)]))[1])[0]
    assert row[COLUMNS.index("user_agent")] == text


def test_csvlog_numbers_and_plain_text_untouched():
    call = sample_call(queue_time_ms=-5.0, input_tokens=-5, user_agent="5 apples", prompt="a=b")
    row = parse(list(iter_csv([call]))[1])[0]
    assert row[COLUMNS.index("queue_time_ms")] == "-5.0" and row[COLUMNS.index("input_tokens")] == "-5"
    assert row[COLUMNS.index("user_agent")] == "5 apples" and row[COLUMNS.index("prompt")] == "a=b"


def test_csvlog_iter_csv_takes_calls_mappings_and_naive_times():
    as_dict = {**sample_call().as_dict(), "timestamp": NOW.replace(tzinfo=None), "model": None}
    lines = list(iter_csv([sample_call(), as_dict]))
    assert lines[0] == HEADER
    first, second = parse(lines[1])[0], parse(lines[2])[0]
    assert first[0] == second[0] == "2025-05-01T12:30:45.123Z"
    assert second[COLUMNS.index("model")] == "" and first[COLUMNS.index("model")] == "llama3.2"


def test_csvlog_header_once_across_appends(tmp_path):
    log = CsvLog(tmp_path / "calls.csv", clock=lambda: NOW)
    for _ in range(3):
        log.append([sample_call(), sample_call()])
    rows = parse(log.path.read_text())
    assert rows.count(list(COLUMNS)) == 1 and len(rows) == 7


def test_csvlog_rotates_by_size_keeping_every_row(tmp_path):
    log = CsvLog(tmp_path / "calls.csv", max_bytes=2000, clock=lambda: datetime.now(UTC))
    for _ in range(10):
        log.append([sample_call(), sample_call()])
    files = [*log.rotated_files(), log.path]
    assert len(files) >= 4
    data_rows = 0
    for path in files:
        rows = parse(path.read_text())
        assert rows[0] == list(COLUMNS) and list(COLUMNS) not in rows[1:]
        data_rows += len(rows) - 1
    assert data_rows == 20


def test_csvlog_rotates_by_day(tmp_path):
    log = CsvLog(tmp_path / "calls.csv", clock=lambda: datetime(2025, 5, 2, 0, 0, 1, tzinfo=UTC))
    log.append([sample_call()])
    yesterday = datetime(2025, 5, 1, 23, 59, 58, tzinfo=UTC).timestamp()
    os.utime(log.path, (yesterday, yesterday))
    log.append([sample_call(request_id="today")])
    assert [path.name for path in log.rotated_files()] == ["calls.2025-05-01T235958Z.csv"]
    assert len(parse(log.rotated_files()[0].read_text())) == 2
    today = parse(log.path.read_text())
    assert today[0] == list(COLUMNS) and today[1][1] == "today" and len(today) == 2


def test_csvlog_file_with_other_header_gets_rotated(tmp_path):
    path = tmp_path / "calls.csv"
    path.write_text("timestamp,request_id\r\n2025-01-01T00:00:00.000Z,x\r\n")
    log = CsvLog(path, clock=lambda: datetime.fromtimestamp(path.stat().st_mtime, UTC))
    log.append([sample_call()])
    assert len(log.rotated_files()) == 1 and log.rotated_files()[0].read_bytes().startswith(b"timestamp,request_id\r\n")
    assert parse(path.read_text())[0] == list(COLUMNS)


def test_csvlog_prune_deletes_only_files_older_than_cutoff(tmp_path):
    log = CsvLog(tmp_path / "calls.csv", clock=lambda: NOW)
    log.append([sample_call()])
    cutoff = NOW - timedelta(days=7)
    ages = {
        "calls.2025-04-20T000000Z.csv": -86400,
        "calls.2025-04-24T123044Z.csv": -1,
        "calls.2025-04-24T123046Z.csv": 1,
    }
    for name, offset in ages.items():
        (tmp_path / name).write_text(HEADER)
        moment = cutoff.timestamp() + offset
        os.utime(tmp_path / name, (moment, moment))
    (tmp_path / "calls.backup.csv").write_text("not ours")
    deleted = log.prune(cutoff)
    assert sorted(path.name for path in deleted) == ["calls.2025-04-20T000000Z.csv", "calls.2025-04-24T123044Z.csv"]
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "calls.2025-04-24T123046Z.csv", "calls.backup.csv", "calls.csv", "calls.csv.lock",
    ]  # fmt: skip


def _append_many(path: str, worker: int) -> None:
    log = CsvLog(path, max_bytes=50_000)
    for batch in range(40):
        log.append([sample_call(request_id=f"{worker}-{batch}-{n}", prompt="x" * 3000) for n in range(5)])


@pytest.mark.skipif(os.name == "nt", reason="fork")
def test_csvlog_processes_never_interleave(tmp_path):
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(str(tmp_path / "calls.csv"), n)) for n in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(30)
        assert process.exitcode == 0
    log = CsvLog(tmp_path / "calls.csv")
    ids = []
    for path in [*log.rotated_files(), log.path]:
        rows = parse(path.read_text())
        assert rows[0] == list(COLUMNS) and all(len(row) == len(COLUMNS) for row in rows)
        ids += [row[1] for row in rows[1:]]
    assert sorted(ids) == sorted(f"{w}-{b}-{n}" for w in range(4) for b in range(40) for n in range(5))
