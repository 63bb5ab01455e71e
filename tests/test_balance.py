"""gunicorn's workers share new connections evenly (service/balance.py): a burst of clients, which the first worker
to wake would otherwise take almost whole, is spread over the workers, and a worker that is gone or not accepting
is never waited for."""

from __future__ import annotations

import math
import os
import socket
import time

import psutil
import pytest

from bench.targets import wait_workers_ready
from proxy_app.service.balance import (
    ASIDE_SECONDS,
    ASIDE_STALE_SECONDS,
    CLAIM_SECONDS,
    LIVE_SECONDS,
    SLACK,
    Share,
    Table,
)
from tests.processes import wait_until

BURST = 40
FEW = 8
BATCH = 256


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_balance_room_is_a_batch_without_live_peers_and_up_to_the_share_of_the_least_loaded_one():
    clock = Clock()
    table = Table(slots=4, clock=clock)
    first, second, third = (Share(table, table.claim()) for _ in range(3))
    assert [first.slot, second.slot, third.slot] == [0, 1, 2]
    assert first.room(0, BATCH) == BATCH  # its peers have not turned their loops yet: they take nothing
    second.publish(10)
    third.publish(4)
    assert first.room(0, BATCH) == 4 + SLACK  # up to SLACK over its least-loaded peer
    assert first.room(4 + SLACK, BATCH) == 1  # at its share it still takes one
    third.publish(400)
    second.publish(400)
    assert first.room(450, BATCH) == 50  # a quarter over the least-loaded peer, when that is more than SLACK
    third.leave()
    second.publish(10)
    assert first.room(0, BATCH) == 10 + SLACK  # a worker that stopped accepting is not counted
    clock.now += LIVE_SECONDS
    assert first.room(100, BATCH) == BATCH  # nor one whose loop has not turned for LIVE_SECONDS


def test_balance_a_worker_over_its_share_steps_aside_then_takes_one_if_a_connection_still_waits():
    clock = Clock()
    table = Table(slots=2, clock=clock)
    heavy, light = Share(table, table.claim()), Share(table, table.claim())
    light.publish(0)
    assert not heavy.is_aside() and heavy.longest_wait() == math.inf
    assert heavy.room(SLACK + 1, BATCH) == 0  # over its share: the waiting connections are its peers' for now
    assert heavy.is_aside() and heavy.longest_wait() == pytest.approx(ASIDE_SECONDS)  # its loop turns by then
    clock.now += ASIDE_SECONDS
    assert not heavy.is_aside() and heavy.longest_wait() == math.inf  # no busy loop once the step aside is over
    assert heavy.room(SLACK + 1, BATCH) == 1  # one still waits: a peer slow to accept holds nobody up for long
    assert heavy.room(SLACK + 2, BATCH) == 0  # and the next one is left to the peers again
    light.publish(SLACK + 4)
    assert heavy.room(SLACK + 2, BATCH) == SLACK + 2 and not heavy.is_aside()  # back within its share
    clock.now += LIVE_SECONDS  # its peer's loop stopped turning: nobody to step aside for
    assert heavy.room(100, BATCH) == BATCH


def test_balance_a_step_aside_no_connection_outlived_is_over_and_the_next_one_steps_aside_first():
    clock = Clock()
    table = Table(slots=2, clock=clock)
    heavy, light = Share(table, table.claim()), Share(table, table.claim())
    light.publish(0)
    assert heavy.room(SLACK + 1, BATCH) == 0  # steps aside; its peer takes the connection, none waits after it
    clock.now += 2 * ASIDE_STALE_SECONDS
    light.publish(0)  # the peer's loop turns on
    assert not heavy.is_aside()
    assert heavy.room(SLACK + 1, BATCH) == 0  # a new connection, much later: left to the peer first, again
    assert heavy.is_aside()
    clock.now += ASIDE_SECONDS
    assert heavy.room(SLACK + 1, BATCH) == 1  # and taken if it still waits after that


def test_balance_claim_reuses_a_gone_workers_slot_never_a_booting_or_live_one():
    clock = Clock()
    table = Table(slots=4, clock=clock)
    live, booting, gone = table.claim(), table.claim(), table.claim()
    Share(table, live).publish(5)
    Share(table, gone).publish(7)
    clock.now += CLAIM_SECONDS
    Share(table, live).publish(5)  # its loop turns; the booting worker's never has yet, the gone one's stopped
    clock.now += LIVE_SECONDS
    Share(table, live).publish(5)
    assert table.claim() == booting  # quiet past CLAIM_SECONDS: its worker never started
    assert table.claim() == gone
    assert table.claim() == 3  # none free: a new one


def test_balance_a_forked_worker_writes_where_the_arbiter_and_its_peers_read():
    table = Table(slots=2)
    slot = table.claim()
    child = os.fork()
    if child == 0:  # the worker: publishes and leaves at once
        try:
            Share(table, slot).publish(7)
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    other = table.claim()
    assert table.least_of_peers(other) == 7


def _held(worker: psutil.Process, port: int) -> set[int]:
    """The client ports of the connections to the proxy's ``port`` that ``worker`` holds."""
    try:
        connections = worker.net_connections(kind="tcp")
    except psutil.Error:
        return set()
    return {c.raddr.port for c in connections if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port}


def _two_workers(gunicorn_proxy):
    """The proxy under gunicorn with two workers, both serving."""
    proxy = gunicorn_proxy(workers=2, threads=8)
    workers = psutil.Process(proxy.process.pid).children()
    assert len(workers) == 2
    wait_workers_ready(2, proxy.process, timeout=20)
    time.sleep(0.3)  # and a loop turn more: each worker's count published
    return proxy, workers


def _connect(proxy, clients: list, count: int, workers) -> list[set[int]]:
    """Open ``count`` more connections at once; once every one is accepted, the client ports each worker holds."""
    for _ in range(count):
        clients.append(socket.create_connection(("127.0.0.1", proxy.port)))
    wait_until(lambda: sum(len(_held(worker, proxy.port)) for worker in workers) == len(clients), timeout=10,
               message="every connection accepted")  # fmt: skip
    return [_held(worker, proxy.port) for worker in workers]


def _health(client: socket.socket) -> bytes:
    client.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    client.settimeout(10)
    return client.recv(64)


def test_balance_a_burst_of_clients_is_spread_over_gunicorns_workers(gunicorn_proxy):
    """BURST clients connect at once and keep their connections: each worker holds about half (the first worker to
    wake would take them all), and every connection is served."""
    proxy, workers = _two_workers(gunicorn_proxy)
    clients: list[socket.socket] = []
    try:
        held = sorted(map(len, _connect(proxy, clients, BURST, workers)))
        assert held[1] - held[0] <= SLACK + 2, held
        assert all(_health(client).startswith(b"HTTP/1.1 200 ") for client in clients)
    finally:
        for client in clients:
            client.close()


def test_balance_a_few_clients_are_split_evenly_over_gunicorns_workers(gunicorn_proxy):
    """Eight clients connect at once, four times over: each time both workers take some (the first worker to wake,
    or a share of eight over its peer, would take all eight). How evenly depends on how soon the other worker gets
    a core: on a busy 2-core machine, seven and one at worst."""
    proxy, workers = _two_workers(gunicorn_proxy)
    for _ in range(4):
        clients: list[socket.socket] = []
        try:
            held = sorted(map(len, _connect(proxy, clients, FEW, workers)))
        finally:
            for client in clients:
                client.close()
        assert held[0] >= 1, held
        wait_until(lambda: not any(_held(worker, proxy.port) for worker in workers), timeout=10,
                   message="the closes read")  # fmt: skip
        time.sleep(0.1)  # a loop turn: each worker's count published


def test_balance_a_stuck_worker_slows_new_connections_never_stops_them(gunicorn_proxy):
    """A worker holding no connection stops (SIGSTOP): the other, over its share, still takes new connections, one
    every ASIDE_SECONDS, and all of them once the stopped one has been quiet for LIVE_SECONDS."""
    proxy, workers = _two_workers(gunicorn_proxy)
    clients: list[socket.socket] = []
    try:
        held = _connect(proxy, clients, BURST, workers)
        stuck = workers[0]
        for client in [client for client in clients if client.getsockname()[1] in held[0]]:
            clients.remove(client)  # the other worker is over its share from now on
            client.close()
        wait_until(lambda: not _held(stuck, proxy.port), timeout=10, message="the closes read")
        time.sleep(0.1)  # a loop turn: its count published
        stuck.suspend()
        try:
            started = time.monotonic()
            for _ in range(5):
                with socket.create_connection(("127.0.0.1", proxy.port)) as client:
                    assert _health(client).startswith(b"HTTP/1.1 200 ")
            assert time.monotonic() - started < LIVE_SECONDS / 2  # not waiting for the stopped worker to count out
        finally:
            stuck.resume()
    finally:
        for client in clients:
            client.close()
