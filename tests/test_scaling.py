"""Redis Cluster and Sentinel: every route, the one-slot rule, and failovers."""

from __future__ import annotations

import gc
import logging
import threading
import time

import pytest
import redis
from redis.crc import key_slot
from redis.sentinel import Sentinel

from harness.clients import add_active_job
from harness.servers import ClusterServers, Sentinels, wait_until
from tests.helpers import API_TOKEN, JOB_TOKEN, bearer, next_event, open_events


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with ClusterServers(tmp_path_factory.mktemp("cluster")) as the_cluster:
        yield the_cluster


@pytest.fixture
def data(cluster):
    """Yield a client of the cluster, emptied before the test."""
    client = redis.RedisCluster(
        host="127.0.0.1", port=cluster.masters[1].port, decode_responses=True
    )
    client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
    yield client
    client.close()


@pytest.fixture
def cluster_app(make_app, cluster):
    """Return a function that makes an app on the cluster, with other settings too."""
    nodes = tuple(("127.0.0.1", node.port) for node in cluster.masters)

    def make(**settings):
        return make_app(REDIS_URL=None, REDIS_CLUSTER=True, REDIS_CLUSTER_NODES=nodes, **settings)

    return make


def test_every_route_works_on_every_master(cluster_app, cluster, data):
    client = cluster_app().test_client()
    for queue in cluster.queues_per_master():
        key = add_active_job(data, queue, "1", JOB_TOKEN)
        url = f"/queues/{queue}/jobs/1"
        assert (
            client.post(f"{url}/progress", data=b"50", headers=bearer(JOB_TOKEN)).status_code == 200
        )
        assert (
            client.post(f"{url}/logs", data=b"a line", headers=bearer(JOB_TOKEN)).status_code == 200
        )
        response = client.get(f"{url}/logs", headers=bearer(API_TOKEN))
        assert response.get_json() == {"count": 1, "logs": ["a line"]}
        assert data.hget(key, "progress") == "50"
        assert data.xlen(f"bull:{queue}:events") == 1
        assert client.post(f"{url}/logs", data=b"x", headers=bearer("wrong")).status_code == 401
    assert client.get("/readyz").status_code == 200


def test_a_jobs_events_stream_on_every_master(cluster_app, cluster, data):
    client = cluster_app().test_client()
    for queue in cluster.queues_per_master():
        add_active_job(data, queue, "1", JOB_TOKEN)
        url = f"/queues/{queue}/jobs/1"
        client.post(f"{url}/progress", data=b"1", headers=bearer(JOB_TOKEN))
        events = open_events(client, f"{url}/events")
        assert next_event(events).data == "1"
        client.post(f"{url}/progress", data=b"2", headers=bearer(JOB_TOKEN))
        client.post(f"{url}/logs", data=b"a line", headers=bearer(JOB_TOKEN))
        got = [next_event(events), next_event(events)]
        assert [(event.event, event.data) for event in got] == [
            ("progress", "2"),
            ("log", '{"index":0,"line":"a line"}'),
        ]


def tcp_clients(servers) -> set[tuple[int, str]]:
    """Return the clients connected to the servers over TCP, by server (its index) and
    id."""
    clients = set()
    for n, server in enumerate(servers):
        with server.admin() as admin:
            clients |= {
                (n, client["id"])
                for client in admin.client_list("normal")
                if client["addr"].startswith("127.0.0.1:")
            }
    return clients


def test_closing_the_app_closes_its_connections_to_every_node(cluster_app, cluster, data):
    queues = cluster.queues_per_master()
    for queue in queues:
        add_active_job(data, queue, "1", JOB_TOKEN)
    before = tcp_clients(cluster.masters)  # this test's own client's, any closing still
    app = cluster_app()
    client = app.test_client()
    for queue in queues:
        url = f"/queues/{queue}/jobs/1/progress"
        assert client.post(url, data=b"1", headers=bearer(JOB_TOKEN)).status_code == 200
    events = open_events(client, f"/queues/{queues[0]}/jobs/1/events")
    assert next_event(events).data == "1"  # the event reader reads the cluster too
    opened = tcp_clients(cluster.masters) - before
    assert {n for n, _ in opened} == {0, 1, 2}  # the app's, on every master
    app.extensions["bullmq_http"].close()
    wait_until(lambda: not opened & tcp_clients(cluster.masters), 10, "the connections to close")


def test_seed_nodes_may_come_from_redis_url(make_app, cluster, data):
    seeds = ",".join(f"redis://127.0.0.1:{node.port}" for node in cluster.masters[1:])
    client = make_app(REDIS_CLUSTER=True, REDIS_URL=seeds).test_client()
    key = add_active_job(data, "{q}", "1", JOB_TOKEN)
    response = client.post("/queues/{q}/jobs/1/progress", data=b"3", headers=bearer(JOB_TOKEN))
    assert response.status_code == 200
    assert data.hget(key, "progress") == "3"


def test_a_prefix_hash_tag_serves_every_queue(cluster_app, cluster, data):
    client = cluster_app(QUEUE_PREFIX="{jobs}").test_client()
    for queue in ("orders", "emails", "reports"):
        key = add_active_job(data, queue, "1", JOB_TOKEN, prefix="{jobs}")
        response = client.post(
            f"/queues/{queue}/jobs/1/progress", data=b"7", headers=bearer(JOB_TOKEN)
        )
        assert response.status_code == 200
        assert data.hget(key, "progress") == "7"


def test_keys_in_different_slots_are_a_400_not_a_crossslot_500(cluster_app, cluster, data, caplog):
    with caplog.at_level(logging.WARNING, logger="app"):
        client = cluster_app().test_client()
    assert "QUEUE_PREFIX=bull has no hash tag" in caplog.text
    assert key_slot(b"bull:plain:1") != key_slot(b"bull:plain:events")
    key = add_active_job(data, "plain", "1", JOB_TOKEN)
    for method, route, token in [
        ("POST", "progress", JOB_TOKEN),
        ("POST", "logs", JOB_TOKEN),
        ("GET", "logs", API_TOKEN),
    ]:
        response = client.open(
            f"/queues/plain/jobs/1/{route}", method=method, data=b"1", headers=bearer(token)
        )
        assert response.status_code == 400
        assert response.get_data(as_text=True).startswith(
            "on Redis Cluster a queue's keys must share one slot: give QUEUE_PREFIX a hash tag"
        )
    assert data.hget(key, "progress") is None
    assert not data.exists("bull:plain:1:logs", "bull:plain:events", "bull:plain:meta")


def test_the_queues_with_active_jobs_are_found_on_every_master(cluster_app, cluster, data):
    """What a restarted process resumes the stalled check for: a queue on each master."""
    queues = cluster.queues_per_master()
    for queue in queues:
        add_active_job(data, queue, "1", JOB_TOKEN)
    store = cluster_app().extensions["bullmq_http"].store
    assert sorted(store.queues_with_active_jobs()) == sorted(queues)


# Before the failover below, which leaves a master stopped for the module's other tests.
def test_a_write_whose_reply_is_lost_is_never_sent_again(cluster_app, cluster, data):
    """Every master cuts its clients' connections every 20 ms while twelve writers post
    lines to a job on each: a line is stored at most once, and every one answered 200
    is stored exactly once; a reply lost in flight is a 503, never a second write."""
    client = cluster_app(REDIS_TIMEOUT=1).test_client()
    queues = cluster.queues_per_master()
    for queue in queues:
        add_active_job(data, queue, "1", JOB_TOKEN)
    stop = threading.Event()
    acknowledged: list[list[str]] = [[] for _ in range(12)]
    answered: list[list[int]] = [[] for _ in range(12)]

    def write(writer: int) -> None:
        url = f"/queues/{queues[writer % 3]}/jobs/1/logs"
        n = 0
        while not stop.is_set():
            line = f"writer {writer} line {n}"
            status = client.post(url, data=line.encode(), headers=bearer(JOB_TOKEN)).status_code
            answered[writer].append(status)
            if status == 200:
                acknowledged[writer].append(line)
            n += 1

    def cut() -> None:
        masters = [node.admin() for node in cluster.masters]
        try:
            while not stop.wait(0.02):
                for master in masters:
                    master.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        finally:
            for master in masters:
                master.close()

    threads = [threading.Thread(target=write, args=(n,)) for n in range(12)]
    threads.append(threading.Thread(target=cut))
    for thread in threads:
        thread.start()
    time.sleep(3)
    stop.set()
    for thread in threads:
        thread.join(30)
    stored = [line for queue in queues for line in data.lrange(f"bull:{queue}:1:logs", 0, -1)]
    twice = {line for line in stored if stored.count(line) > 1}
    assert not twice, f"{len(twice)} lines stored twice"
    assert {line for lines in acknowledged for line in lines} <= set(stored)
    statuses = [status for writer in answered for status in writer]
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses


def post_until_recovered(client, url: str, first: int, seconds: float = 20.0):
    """Post numbered lines through a failover; return (statuses, acknowledged lines)."""
    statuses, acknowledged = [], []
    deadline = time.monotonic() + seconds
    n = first
    while time.monotonic() < deadline:
        line = f"line {n}"
        response = client.post(url, data=line.encode(), headers=bearer(JOB_TOKEN))
        statuses.append(response.status_code)
        if response.status_code == 200:
            acknowledged.append(line)
            if statuses[-5:] == [200] * 5 and 503 in statuses:
                break
        else:
            assert response.headers["Retry-After"] == "1"
            time.sleep(0.05)
        n += 1
    return statuses, acknowledged


def test_a_master_failover_answers_503_then_200_and_loses_nothing(cluster_app, cluster, data):
    client = cluster_app(REDIS_TIMEOUT=0.5).test_client()
    queue = cluster.queues_per_master()[0]  # a queue on the master about to stop
    add_active_job(data, queue, "1", JOB_TOKEN)
    url = f"/queues/{queue}/jobs/1/logs"
    before = [f"line {n}" for n in range(20)]
    for line in before:
        assert client.post(url, data=line.encode(), headers=bearer(JOB_TOKEN)).status_code == 200
    # Every acknowledged write has reached the replica before its master goes.
    with cluster.masters[0].admin() as master:
        assert master.execute_command("WAIT", 1, 2000) == 1

    cluster.masters[0].stop()
    statuses, during = post_until_recovered(client, url, first=20)

    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses and statuses[-5:] == [200] * 5
    response = client.get(f"/queues/{queue}/jobs/1/logs?length=100", headers=bearer(API_TOKEN))
    assert response.status_code == 200
    assert response.get_json()["logs"] == before + during


@pytest.fixture
def sentinels(tmp_path):
    with Sentinels(tmp_path) as the_sentinels:
        yield the_sentinels


@pytest.fixture
def sentinel(sentinels):
    """Yield redis-py's Sentinel client of the sentinels; close its connections after."""
    manager = Sentinel(sentinels.addresses())
    yield manager
    for client in manager.sentinels:
        client.close()


@pytest.fixture
def sentinel_data(sentinels, sentinel):
    """Yield a client of the Sentinel master; close it after the test."""
    client = sentinel.master_for(sentinels.name, decode_responses=True)
    yield client
    client.close()


# `sentinels` comes first: its servers stop after the app's event reader, not under it.
def test_a_sentinel_failover_answers_503_then_200_and_loses_nothing(
    sentinels, make_app, sentinel, sentinel_data
):
    app = make_app(
        REDIS_URL=None,
        REDIS_SENTINELS=sentinels.addresses(),
        REDIS_SENTINEL_MASTER=sentinels.name,
        REDIS_TIMEOUT=0.5,
    )
    client = app.test_client()
    add_active_job(sentinel_data, "orders", "1", JOB_TOKEN)
    url = "/queues/orders/jobs/1/logs"
    before = [f"line {n}" for n in range(20)]
    for line in before:
        assert client.post(url, data=line.encode(), headers=bearer(JOB_TOKEN)).status_code == 200
    with sentinels.master.admin() as master:
        assert master.execute_command("WAIT", 1, 2000) == 1

    sentinels.master.stop()
    statuses, during = post_until_recovered(client, url, first=20)

    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses and statuses[-5:] == [200] * 5
    assert sentinel.discover_master(sentinels.name)[1] == sentinels.replica.port
    response = client.get(f"{url}?length=100", headers=bearer(API_TOKEN))
    assert response.get_json()["logs"] == before + during


def sentinel_app(make_app, sentinels):
    """Return an app on the sentinels' master, with the other settings as by default."""
    return make_app(
        REDIS_URL=None, REDIS_SENTINELS=sentinels.addresses(), REDIS_SENTINEL_MASTER=sentinels.name
    )


def test_a_jobs_events_stream_through_sentinel(sentinels, make_app, sentinel_data):
    client = sentinel_app(make_app, sentinels).test_client()
    add_active_job(sentinel_data, "orders", "1", JOB_TOKEN)
    events = open_events(client, "/queues/orders/jobs/1/events")
    client.post("/queues/orders/jobs/1/progress", data=b"7", headers=bearer(JOB_TOKEN))
    event = next_event(events)
    assert (event.event, event.data) == ("progress", "7")


def test_closing_the_app_closes_its_connections_to_the_sentinels(
    sentinels, make_app, sentinel_data
):
    add_active_job(sentinel_data, "orders", "1", JOB_TOKEN)
    servers = [sentinels.master, *sentinels.sentinels]
    before = tcp_clients(servers)  # this test's own client's, any closing still
    app = sentinel_app(make_app, sentinels)
    client = app.test_client()
    url = "/queues/orders/jobs/1/progress"
    assert client.post(url, data=b"1", headers=bearer(JOB_TOKEN)).status_code == 200
    events = open_events(client, "/queues/orders/jobs/1/events")
    assert next_event(events).data == "1"  # the event reader finds the master too
    opened = tcp_clients(servers) - before
    reached = {n for n, _ in opened}
    # The app's, on the master and on the sentinel that told it where the master is.
    assert 0 in reached and reached & {1, 2, 3}, reached
    gc.disable()  # closed by the app, not found later by the garbage collector
    try:
        app.extensions["bullmq_http"].close()
        wait_until(lambda: not opened & tcp_clients(servers), 10, "the connections to close")
    finally:
        gc.enable()
