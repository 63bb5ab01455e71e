"""Request ids: unique across threads and across forked processes, 32 hex digits."""

from __future__ import annotations

import os
import re
import threading

from proxy_app.relay.inflight import new_request_id

HEX_ID = re.compile(r"[0-9a-f]{32}")


def test_request_ids_from_many_threads_are_all_different():
    ids: list[list[str]] = [[] for _ in range(8)]

    def draw(mine: list[str]) -> None:
        mine.extend(new_request_id() for _ in range(20_000))

    threads = [threading.Thread(target=draw, args=(mine,)) for mine in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [one for mine in ids for one in mine]
    assert len(set(every)) == len(every) == 160_000
    assert all(HEX_ID.fullmatch(one) for one in every)


def test_a_forked_child_draws_ids_of_its_own():
    before = new_request_id()
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: as a gunicorn worker forked from the arbiter that loaded the app
        os.write(writing, new_request_id().encode())
        os._exit(0)
    os.close(writing)
    child = os.read(reading, 64).decode()
    os.close(reading)
    os.waitpid(pid, 0)
    after = new_request_id()
    assert HEX_ID.fullmatch(child)
    assert child[:16] != before[:16] == after[:16]  # a new prefix in the child, the parent's own kept
    assert int(after[16:], 16) > int(before[16:], 16)
