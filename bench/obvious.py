"""A yardstick: the job routes as a user would write them by hand in an afternoon.

Plain Flask views calling redis-py directly, with the same stack: the lock is read and
compared, then HSET and XADD (as BullMQ's updateProgress writes), or RPUSH; reading
logs is a pipelined LRANGE and LLEN, answered with jsonify. No access log, metrics,
token scopes, size limits or Lua; the lock check and the write are not one step.
"""

import json
import os

import redis
from flask import Flask, Response, abort, jsonify, request

app = Flask(__name__)
r = redis.Redis.from_url(os.environ["REDIS_URL"])
API_TOKENS = set(os.environ["AUTH_TOKENS"].split(","))


def bearer() -> str:
    return request.headers.get("Authorization", "").removeprefix("Bearer ")


def check_lock(key: str) -> None:
    if r.get(f"{key}:lock") != bearer().encode():
        abort(401)


@app.post("/queues/<queue>/jobs/<job_id>/progress")
def set_progress(queue: str, job_id: str) -> str:
    key = f"bull:{queue}:{job_id}"
    check_lock(key)
    progress = json.dumps(request.get_json(force=True))
    r.hset(key, "progress", progress)
    r.xadd(
        f"bull:{queue}:events",
        {"event": "progress", "jobId": job_id, "data": progress},
        maxlen=10000,
        approximate=True,
    )
    return "OK"


@app.post("/queues/<queue>/jobs/<job_id>/logs")
def add_log(queue: str, job_id: str) -> str:
    key = f"bull:{queue}:{job_id}"
    check_lock(key)
    r.rpush(f"{key}:logs", request.get_data(as_text=True))
    return "OK"


@app.get("/queues/<queue>/jobs/<job_id>/logs")
def read_logs(queue: str, job_id: str) -> Response:
    if bearer() not in API_TOKENS:
        abort(401)
    start = int(request.args.get("start", 0))
    length = int(request.args.get("length", 10))
    pipe = r.pipeline()
    pipe.lrange(f"bull:{queue}:{job_id}:logs", start, start + length - 1)
    pipe.llen(f"bull:{queue}:{job_id}:logs")
    lines, count = pipe.execute()
    return jsonify(count=count, logs=[line.decode() for line in lines])


@app.get("/healthz")
def healthz() -> str:
    return "OK"
