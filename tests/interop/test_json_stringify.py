"""Progress is stored exactly as JavaScript's JSON.stringify(JSON.parse(body)) writes it,
proven against Node itself: the numbers, the escapes and the order of an object's keys."""

from __future__ import annotations

import json
import math
import random
import struct
import subprocess

from app import progress_json
from tests.helpers import JOB_TOKEN, bearer

# Each body as a client would send it.
BODIES = [
    # Numbers: where JavaScript writes digits, where exponents, and how it rounds.
    *("0", "-0", "-0.0", "1", "1.0", "1E2", "100", "0.5", "-1.5", "123.456"),
    *("1e-05", "0.000001", "1e-7", "0.0000001", "1.5e-7", "123e-20", "5e-324"),
    *("1e20", "1e21", "123456789012345678901", "1.7976931348623157e308", "-2.5e300"),
    *("9007199254740993", "12345678901234567890", "0.30000000000000004", "1.00000000000000001"),
    # Objects: array-index keys first, ascending; then the rest as they came.
    '{"b":1,"a":2,"10":3,"2":4,"01":5,"-1":6,"1.5":7,"4294967294":8,"4294967295":9,"0":0}',
    '{"a":1,"b":2,"a":3}',  # a repeated key keeps its first place and its last value
    '{"z":{"9":[1,{"y":1,"1":2}],"x":null},"é":true,"1e3":false}',
    # Strings: what JSON.stringify escapes and what it does not.
    '"tab\\there \\u0001 \\u001f \\u007f \\u2028 \\"q\\" \\\\ \\/ é 東京 😀"',
    '"\\ud800 lone, \\udc00 lone, \\ud83d\\ude00 paired"',
    '[1.0, "1.0", [], {}, [[]], {"":""}]',
    ' \t\n{ "spaced" : [ 1 , 2 ] }\n',
]

STRINGIFY = """
let input = "";
process.stdin.on("data", (chunk) => (input += chunk));
process.stdin.on("end", () => {
  const bodies = JSON.parse(input);
  process.stdout.write(JSON.stringify(bodies.map((body) => JSON.stringify(JSON.parse(body)))));
});
"""


def stringified_by_node(node: str, bodies: list[str]) -> list[str]:
    """Return what JSON.stringify(JSON.parse(body)) gives for each body, from Node."""
    result = subprocess.run(
        [node, "-e", STRINGIFY],
        input=json.dumps(bodies),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(result.stdout)


def test_progress_is_stored_as_json_stringify_writes_it(node, client, r, job):
    key = job()
    stored = []
    for body in BODIES:
        response = client.post(
            "/queues/orders/jobs/1/progress", data=body.encode(), headers=bearer(JOB_TOKEN)
        )
        assert response.status_code == 200, body
        stored.append(r.hget(key, "progress"))
    assert stored == stringified_by_node(node, BODIES)


def random_doubles(count: int) -> list[float]:
    """Return doubles of every magnitude, drawn from their bits, and short decimals."""
    draw = random.Random(20261129)  # noqa: S311 (a fixed seed, for the same numbers each run)
    doubles: list[float] = []
    while len(doubles) < count:
        bits = struct.unpack("<d", draw.getrandbits(64).to_bytes(8, "little"))[0]
        if math.isfinite(bits):
            doubles.append(bits)
        doubles.append(
            round(draw.uniform(-1000, 1000), draw.randrange(8)) * 10.0 ** draw.randrange(-30, 30)
        )
    return doubles


def test_any_number_is_written_as_javascript_writes_it(node, app):
    bodies = [repr(number) for number in random_doubles(5000)]
    with app.app_context():
        written = [progress_json(body.encode()).decode() for body in bodies]
    assert written == stringified_by_node(node, bodies)
