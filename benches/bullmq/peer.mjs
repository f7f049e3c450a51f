// The BullMQ peer of `herald bench delivery` (run by it; see src/bench.rs).
//
// Enqueues N jobs in bulk, then a Worker of the given concurrency makes, per
// job, the same call Herald's EmailSender makes: POST /emails to the same
// fake Resend with an Idempotency-Key, on the same Redis. Prints one JSON
// line: {"jobs", "seconds", "rate"}, timed from the first enqueue to the
// last completion.
//
// With a fifth argument, the provider's requests per second, the Worker runs
// under BullMQ's own rate limiter at that rate ({ max: rps, duration: 1000 })
// and a job the provider answers 429 is retried (attempts 10, fixed 1 s
// backoff), as a BullMQ user facing Resend's limit would configure it.
//
// Usage: node peer.mjs <redis-url> <resend-base-url> <jobs> <concurrency> [rps]
import { Queue, Worker } from 'bullmq';
import IORedis from 'ioredis';

const [redisUrl, resendUrl, jobsArg, concurrencyArg, rpsArg] = process.argv.slice(2);
const jobs = Number(jobsArg);
const concurrency = Number(concurrencyArg);
const rps = rpsArg ? Number(rpsArg) : 0;
const retries = rps ? { attempts: 10, backoff: { type: 'fixed', delay: 1000 } } : {};
const name = `herald-bench-${process.pid}`;
const connection = new IORedis(redisUrl, { maxRetriesPerRequest: null });
const queue = new Queue(name, { connection });

const start = performance.now();
for (let i = 0; i < jobs; i += 1000) {
  const batch = [];
  for (let j = i; j < Math.min(jobs, i + 1000); j++) {
    batch.push({
      name: 'email',
      data: { key: `bullmq-${process.pid}-${j}`, to: `bullmq${j}@example.com` },
      opts: { jobId: `bullmq-${j}`, removeOnComplete: true, removeOnFail: true, ...retries },
    });
  }
  await queue.addBulk(batch);
}

let completed = 0;
const worker = await new Promise((resolve, reject) => {
  const w = new Worker(
    name,
    async (job) => {
      const response = await fetch(`${resendUrl}/emails`, {
        method: 'POST',
        headers: {
          authorization: 'Bearer re_bench',
          'content-type': 'application/json',
          'idempotency-key': job.data.key,
        },
        body: JSON.stringify({
          from: 'Herald Jobs <jobs@herald.localhost>',
          to: [job.data.to],
          subject: 'Your application: Bench at Herald',
          text: 'Thank you for applying for Bench at Herald.',
        }),
      });
      await response.arrayBuffer();
      if (!response.ok) throw new Error(`resend answered ${response.status}`);
    },
    {
      connection: new IORedis(redisUrl, { maxRetriesPerRequest: null }),
      concurrency,
      ...(rps ? { limiter: { max: rps, duration: 1000 } } : {}),
    },
  );
  w.on('completed', () => {
    completed += 1;
    if (completed === jobs) resolve(w);
  });
  w.on('failed', (job, error) => {
    if (!job || job.attemptsMade >= (job.opts.attempts ?? 1)) reject(error);
  });
});
const seconds = (performance.now() - start) / 1000;
console.log(JSON.stringify({ jobs, seconds, rate: jobs / seconds }));
await worker.close();
await queue.obliterate({ force: true });
await queue.close();
connection.disconnect();
process.exit(0);
