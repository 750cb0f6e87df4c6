// bullmq-http against the real BullMQ library for Node.
//
// Run by tests/interop/test_node.py with the service already serving:
//   BULLMQ_HTTP_URL  the service, e.g. http://127.0.0.1:8080
//   REDIS_URL        the Redis server it uses (redis:// or unix://), or
//   REDIS_CLUSTER_NODES  the seeds (host:port,...) of the Redis Cluster it uses
//   QUEUE_PREFIX     the prefix both sides use
//   API_TOKEN        one of the service's AUTH_TOKENS
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { test } from 'node:test';

import { FlowProducer, Job, Queue, QueueEvents, Worker } from 'bullmq';
import { Cluster } from 'ioredis';

const service = process.env.BULLMQ_HTTP_URL;
const prefix = process.env.QUEUE_PREFIX;
const apiToken = process.env.API_TOKEN;
const clusterNodes = process.env.REDIS_CLUSTER_NODES;

// Workers block on Redis, which BullMQ wants retried for ever.
const forever = { maxRetriesPerRequest: null };

// Connection options for one Queue, Worker or QueueEvents: BullMQ takes options for a
// single server, and a client of its own for a cluster.
function connection() {
  if (clusterNodes) {
    const nodes = clusterNodes.split(',').map((node) => {
      const [host, port] = node.split(':');
      return { host, port: Number(port) };
    });
    return new Cluster(nodes, { redisOptions: forever });
  }
  const parsed = new URL(process.env.REDIS_URL);
  if (parsed.protocol === 'unix:') return { ...forever, path: parsed.pathname };
  return { ...forever, host: parsed.hostname, port: Number(parsed.port || 6379) };
}

// Close the clients made for a cluster: BullMQ leaves a client it was given open.
async function release(options) {
  if (options instanceof Cluster) await options.quit();
}

// QueueEvents for a queue of the test's own, from the first event: by default it hears
// only events after its first read, which can come after a worker's first jobs ended.
const listen = (name, eventsConnection) =>
  new QueueEvents(name, { connection: eventsConnection, prefix, lastEventId: '0' });

async function call(method, path, token, body, contentType) {
  const headers = { Authorization: `Bearer ${token}` };
  if (contentType) headers['Content-Type'] = contentType;
  const response = await fetch(`${service}${path}`, { method, headers, body, signal: AbortSignal.timeout(10000) });
  return { status: response.status, text: await response.text() };
}

const jobPath = (queue, id) => `/queues/${queue}/jobs/${encodeURIComponent(id)}`;
const postProgress = (queue, id, token, value) =>
  call('POST', `${jobPath(queue, id)}/progress`, token, JSON.stringify(value), 'application/json');
const postLog = (queue, id, token, body, contentType) =>
  call('POST', `${jobPath(queue, id)}/logs`, token, body, contentType);
async function getLogs(queue, id, query) {
  const response = await call('GET', `${jobPath(queue, id)}/logs?${query}`, apiToken);
  assert.equal(response.status, 200, response.text);
  return JSON.parse(response.text);
}

// Each scenario has a deadline of its own, so that a hang fails and names its test.
const bounded = { timeout: 30000 };

async function until(condition, what, ms = 5000) {
  const deadline = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

// A queue of this test's own, and a worker that processes by hand, so the test holds
// each job's lock token as an HTTP worker would.
async function openQueue(t, workerOptions = {}) {
  const name = `interop-${randomUUID().slice(0, 8)}`;
  const connections = [connection(), connection()];
  const queue = new Queue(name, { connection: connections[0], prefix });
  const worker = new Worker(name, null, { connection: connections[1], prefix, ...workerOptions });
  t.after(async () => {
    await worker.close();
    await queue.close();
    await Promise.all(connections.map(release));
  });
  const take = async (jobOptions = {}) => {
    const added = await queue.add('report', { n: 1 }, jobOptions);
    const token = randomUUID();
    const job = await worker.getNextJob(token);
    assert.equal(job.id, added.id);
    return { job, token };
  };
  return { name, queue, worker, take };
}

test('progress over HTTP is what Job.fromId reads and QueueEvents hears', bounded, async (t) => {
  const { name, queue, take } = await openQueue(t);
  const eventsConnection = connection();
  const events = listen(name, eventsConnection);
  t.after(async () => {
    await events.close();
    await release(eventsConnection);
  });
  const heard = [];
  events.on('progress', ({ jobId, data }) => heard.push({ jobId, data }));
  await events.waitUntilReady();

  const { job, token } = await take();
  const values = [42, { step: 3, of: 10 }, 'halfway', { msg: 'Größe 東京 ✓', ratio: 0.5 }];
  for (const value of values) {
    const response = await postProgress(name, job.id, token, value);
    assert.deepEqual(response, { status: 200, text: 'OK' });
    assert.deepEqual((await Job.fromId(queue, job.id)).progress, value);
  }
  await until(() => heard.length === values.length, 'progress events');
  assert.deepEqual(heard, values.map((data) => ({ jobId: job.id, data })));
});

test('log lines over HTTP come back from getJobLogs in order', bounded, async (t) => {
  const { name, queue, take } = await openQueue(t);
  const { job, token } = await take();
  const sent = [
    [JSON.stringify('a JSON line'), 'application/json'],
    ['a plain line', 'text/plain'],
    ['Größe 東京 ✓', 'text/plain; charset=utf-8'],
    ['no content type at all', undefined],
  ];
  for (const [body, contentType] of sent) {
    assert.deepEqual(await postLog(name, job.id, token, body, contentType), { status: 200, text: 'OK' });
  }
  assert.deepEqual(await queue.getJobLogs(job.id), {
    logs: ['a JSON line', 'a plain line', 'Größe 東京 ✓', 'no content type at all'],
    count: 4,
  });
});

test('job.log lines come back from GET logs, paged, in both orders', bounded, async (t) => {
  const { name, queue, take } = await openQueue(t);
  const { job } = await take();
  for (let n = 0; n < 25; n += 1) await job.log(`line ${n}`);

  for (const [start, length] of [[0, 10], [10, 10], [20, 10], [24, 1], [30, 5]]) {
    const end = start + length - 1;
    for (const asc of [true, false]) {
      const page = await getLogs(name, job.id, `start=${start}&length=${length}&order=${asc ? 'asc' : 'desc'}`);
      assert.deepEqual(page, await queue.getJobLogs(job.id, start, end, asc));
      assert.equal(page.count, 25);
    }
  }
  assert.deepEqual((await getLogs(name, job.id, 'order=desc&length=2')).logs, ['line 24', 'line 23']);
});

test('keepLogs keeps the same newest lines over HTTP as with job.log', bounded, async (t) => {
  const { name, queue, take } = await openQueue(t);
  const overHttp = await take({ keepLogs: 3 });
  const direct = await take({ keepLogs: 3 });
  for (let n = 0; n < 5; n += 1) {
    assert.equal((await postLog(name, overHttp.job.id, overHttp.token, `line ${n}`)).status, 200);
    await direct.job.log(`line ${n}`);
  }
  const kept = { logs: ['line 2', 'line 3', 'line 4'], count: 3 };
  assert.deepEqual(await queue.getJobLogs(overHttp.job.id), kept);
  assert.deepEqual(await queue.getJobLogs(direct.job.id), kept);
});

test('a finished job, or another job, refuses the token and keeps its state', bounded, async (t) => {
  const { name, queue, take } = await openQueue(t);
  const completed = await take();
  const failed = await take();
  const active = await take();

  assert.equal((await postProgress(name, completed.job.id, completed.token, 50)).status, 200);
  assert.equal((await postLog(name, completed.job.id, completed.token, 'before')).status, 200);
  await completed.job.moveToCompleted('done', completed.token, false);
  await failed.job.moveToFailed(new Error('broken'), failed.token, false);

  for (const { job, token } of [completed, failed]) {
    const refused = await postProgress(name, job.id, token, 99);
    assert.equal(refused.status, 401);
    assert.match(refused.text, /lock/);
    assert.equal((await postLog(name, job.id, token, 'after')).status, 401);
  }
  assert.equal((await Job.fromId(queue, completed.job.id)).progress, 50);
  assert.deepEqual(await queue.getJobLogs(completed.job.id), { logs: ['before'], count: 1 });
  assert.equal(await completed.job.getState(), 'completed');
  assert.equal(await failed.job.getState(), 'failed');

  // The lock token of one active job opens no other.
  assert.equal((await postProgress(name, completed.job.id, active.token, 1)).status, 401);
  assert.equal((await postLog(name, failed.job.id, active.token, 'x')).status, 401);
  assert.deepEqual(await queue.getJobLogs(failed.job.id), { logs: [], count: 0 });
  assert.equal((await postProgress(name, active.job.id, active.token, 1)).status, 200);
});

test('a lock that BullMQ extends keeps the token valid past its first duration', bounded, async (t) => {
  const { name, queue, take } = await openQueue(t, { lockDuration: 600 });
  const extended = await take();
  const lapsed = await take();
  await extended.job.extendLock(extended.token, 30000);
  await sleep(900);

  assert.deepEqual(await postProgress(name, extended.job.id, extended.token, 75), { status: 200, text: 'OK' });
  assert.equal((await Job.fromId(queue, extended.job.id)).progress, 75);
  assert.equal((await postProgress(name, lapsed.job.id, lapsed.token, 75)).status, 401);
});

// An HTTP worker: claim the queue's next job, or null when none is ready; `body` may
// complete the job claimed before.
async function claim(queue, body) {
  const response = await call('POST', `/queues/${queue}/claim`, apiToken, body);
  if (response.status === 204) return null;
  assert.equal(response.status, 200, response.text);
  return JSON.parse(response.text);
}

test('HTTP workers beside a native Worker complete every job exactly once', bounded, async (t) => {
  const name = `interop-${randomUUID().slice(0, 8)}`;
  const connections = [connection(), connection(), connection()];
  const queue = new Queue(name, { connection: connections[0], prefix });
  const events = listen(name, connections[2]);
  let native;
  t.after(async () => {
    await native?.close();
    await events.close();
    await queue.close();
    await Promise.all(connections.map(release));
  });
  const completedBy = new Map();
  events.on('completed', ({ jobId, returnvalue }) => {
    completedBy.set(jobId, [...(completedBy.get(jobId) ?? []), returnvalue]);
  });
  await events.waitUntilReady();
  const total = 60;
  await queue.addBulk(Array.from({ length: total }, (_, n) => ({ name: 'job', data: { n } })));
  native = new Worker(name, async () => 'native', { connection: connections[1], prefix, concurrency: 2 });
  const overHttp = async () => {
    let job;
    while ((job = await claim(name))) {
      const done = await call('POST', `${jobPath(name, job.id)}/complete`, job.token, '"http"');
      assert.deepEqual(done, { status: 200, text: 'OK' });
    }
  };
  // Each completion in the next claim: BullMQ's own fetch of the next job.
  const overHttpTogether = async () => {
    let job = await claim(name);
    while (job) {
      const complete = { id: job.id, token: job.token, returnvalue: 'http' };
      const next = await claim(name, JSON.stringify({ complete }));
      assert.ok(next === null || next.token !== job.token, 'the next job took the finished token');
      job = next;
    }
  };
  await Promise.all([overHttp(), overHttp(), overHttpTogether(), overHttpTogether()]);
  await until(() => completedBy.size === total, 'every job completed', 15000);
  await sleep(200); // a second completion would be heard by now
  assert.ok([...completedBy.values()].every((values) => values.length === 1), 'completed twice');
  const byHttp = [...completedBy.values()].filter(([value]) => value === 'http').length;
  assert.ok(byHttp > 0, 'no job was worked over HTTP');
  for (const [jobId, [value]] of completedBy) {
    const job = await Job.fromId(queue, jobId);
    assert.equal(await job.getState(), 'completed');
    assert.equal(job.returnvalue, value);
  }
});

test('a flow child completed over HTTP releases its parent with its value', bounded, async (t) => {
  const children = `interop-${randomUUID().slice(0, 8)}`;
  const parents = `interop-${randomUUID().slice(0, 8)}`;
  const connections = [connection(), connection(), connection()];
  const flows = new FlowProducer({ connection: connections[0], prefix });
  const parentQueue = new Queue(parents, { connection: connections[1], prefix });
  const childQueue = new Queue(children, { connection: connections[2], prefix });
  t.after(async () => {
    await flows.close();
    await parentQueue.close();
    await childQueue.close();
    await Promise.all(connections.map(release));
  });
  const tree = await flows.add({
    name: 'parent', queueName: parents, data: {},
    children: [{ name: 'child', queueName: children, data: { items: [1, 2] } }],
  });
  assert.equal(await tree.job.getState(), 'waiting-children');
  const job = await claim(children);
  assert.deepEqual(job.data, { items: [1, 2] });
  assert.equal((await call('POST', `${jobPath(children, job.id)}/complete`, job.token, '{"total":2}')).status, 200);
  const parent = await Job.fromId(parentQueue, tree.job.id);
  assert.equal(await parent.getState(), 'waiting');
  assert.deepEqual(await parent.getChildrenValues(), { [`${prefix}:${children}:${job.id}`]: { total: 2 } });
});

test('a job failed over HTTP backs off as BullMQ computes it, then fails once', bounded, async (t) => {
  const { name, queue } = await openQueue(t);
  const added = await queue.add('flaky', {}, { attempts: 2, backoff: { type: 'fixed', delay: 300 } });
  const failedEvents = [];
  const eventsConnection = connection();
  const events = listen(name, eventsConnection);
  t.after(async () => {
    await events.close();
    await release(eventsConnection);
  });
  events.on('failed', ({ jobId, failedReason }) => failedEvents.push([jobId, failedReason]));
  await events.waitUntilReady();
  const first = await claim(name);
  const retried = await call('POST', `${jobPath(name, first.id)}/fail`, first.token, 'flaked');
  assert.deepEqual(JSON.parse(retried.text), { state: 'delayed', delay: 300 });
  assert.equal(await (await Job.fromId(queue, added.id)).getState(), 'delayed');
  let second;
  const deadline = Date.now() + 5000;
  while (!(second = await claim(name)) && Date.now() < deadline) await sleep(50);
  assert.equal(second.id, added.id);
  assert.equal(second.attemptsMade, 1);
  const final = await call('POST', `${jobPath(name, second.id)}/fail`, second.token, 'for good');
  assert.deepEqual(JSON.parse(final.text), { state: 'failed', delay: 0 });
  const job = await Job.fromId(queue, added.id);
  assert.equal(await job.getState(), 'failed');
  assert.equal(job.failedReason, 'for good');
  await until(() => failedEvents.length === 1, 'the failed event');
  assert.deepEqual(failedEvents, [[added.id, 'for good']]);
});

test('heartbeats keep a 2-second lock for many seconds; when they stop, BullMQ takes the job back', bounded, async (t) => {
  // The service runs BullMQ's stalled check every second here (STALLED_INTERVAL_MS).
  const name = `interop-${randomUUID().slice(0, 8)}`;
  const connections = [connection(), connection()];
  const queue = new Queue(name, { connection: connections[0], prefix });
  const events = listen(name, connections[1]);
  t.after(async () => {
    await events.close();
    await queue.close();
    await Promise.all(connections.map(release));
  });
  const stalled = [];
  events.on('stalled', ({ jobId }) => stalled.push(jobId));
  await events.waitUntilReady();
  const added = await queue.add('long', {});
  const response = await call('POST', `/queues/${name}/claim`, apiToken, '{"lockDuration":2000}', 'application/json');
  const job = JSON.parse(response.text);
  const lockPath = `${jobPath(name, job.id)}/lock`;
  for (let beat = 0; beat < 10; beat += 1) {
    assert.equal((await call('POST', lockPath, job.token, '{"duration":2000}', 'application/json')).status, 200);
    await sleep(500);
  }
  assert.equal(await (await Job.fromId(queue, added.id)).getState(), 'active');
  assert.deepEqual(stalled, []);
  // The worker vanishes: no more heartbeats.
  await until(() => stalled.length === 1, 'the stalled event', 10000);
  assert.deepEqual(stalled, [added.id]);
  assert.equal(await (await Job.fromId(queue, added.id)).getState(), 'waiting');
  assert.equal((await call('POST', lockPath, job.token)).status, 401);
  const again = await claim(name);
  assert.equal(again.id, added.id);
  assert.notEqual(again.token, job.token);
});
