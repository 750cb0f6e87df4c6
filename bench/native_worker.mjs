// `make bench`: a native BullMQ worker for Node working a queue's jobs, the yardstick
// beside the service's HTTP workers. Its BullMQ is the one the interop suite installs.
//   node bench/native_worker.mjs <redis unix socket> <queue> <jobs> <concurrency>
// Completes every job with the value "done", and prints the seconds it took.
import { createRequire } from 'node:module';

const require = createRequire(new URL('../tests/interop/package.json', import.meta.url));
const { Worker } = require('bullmq');

const [socket, queue, jobs, concurrency] = process.argv.slice(2);
const connection = { path: socket, maxRetriesPerRequest: null };
let completed = 0;
const started = process.hrtime.bigint();
const worker = new Worker(queue, async () => 'done', {
  connection,
  concurrency: Number(concurrency),
});
await new Promise((resolve) => {
  worker.on('completed', () => {
    completed += 1;
    if (completed === Number(jobs)) resolve();
  });
});
console.log(Number(process.hrtime.bigint() - started) / 1e9);
await worker.close();
