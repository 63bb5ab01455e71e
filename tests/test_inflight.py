"""Request ids: 32 random hex digits, unique across threads and across forked processes, telling no count."""

from __future__ import annotations

import itertools
import os
import re
import threading

from proxy_app.relay.inflight import IDS_PER_DRAW, new_request_id

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


def test_request_ids_tell_nothing_of_how_many_calls_came_between():
    """A caller sees its own ids (X-Request-ID): a count would tell it how many calls others made meanwhile."""
    ids = [int(new_request_id(), 16) for _ in range(4 * IDS_PER_DRAW)]
    rising = sum(later > earlier for earlier, later in itertools.pairwise(ids))
    assert 0.4 < rising / (len(ids) - 1) < 0.6  # about half, as for random numbers; a count would always rise


def test_a_forked_child_never_hands_out_its_parents_ids():
    new_request_id()  # the parent holds a draw of ids it has not handed out yet
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: as a gunicorn worker forked from the arbiter that loaded the app
        os.write(writing, "".join(new_request_id() for _ in range(IDS_PER_DRAW)).encode())
        os._exit(0)
    os.close(writing)
    child = b""
    while piece := os.read(reading, 65536):
        child += piece
    os.close(reading)
    os.waitpid(pid, 0)
    parent_ids = {new_request_id() for _ in range(IDS_PER_DRAW)}
    child_ids = {child[start : start + 32].decode() for start in range(0, len(child), 32)}
    assert len(child_ids) == IDS_PER_DRAW and not child_ids & parent_ids
