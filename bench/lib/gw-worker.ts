/**
 * The peer of the cold-drain benchmark: graphile-worker 0.17 draining the same assign calls as the listener. Its
 * one task POSTs /api/v1/admin/service/assign_agent to the simulator with node's fetch (keep-alive) and reads the
 * answer; a non-2xx answer throws, so graphile-worker retries it. Run as its own process, as `npm run listener`
 * is: node --import tsx bench/lib/gw-worker.ts, with
 *   DATABASE_URL, QISCUS_BASE_URL, QISCUS_APP_ID, QISCUS_SECRET_KEY   as for the listener;
 *   GW_CONCURRENCY (10)   concurrentJobs; the pool is concurrency + 2, as graphile-worker's docs recommend;
 *   GW_BATCHED=1          its batching options: localQueue (GW_LOCAL_QUEUE_SIZE, 500), completeJobBatchDelay 0,
 *                         failJobBatchDelay 0, useNodeTime (the configuration of graphile-worker's own
 *                         performance page, https://worker.graphile.org/docs/performance).
 * Logs only warnings and errors (the listener runs at LOG_LEVEL=warn too): graphile-worker's default console
 * logger writes a line per job.
 */
import { Logger, run, type LogLevel } from 'graphile-worker';

const env = (name: string, fallback?: string): string => {
  const v = process.env[name] ?? fallback;
  if (v === undefined) {
    process.stderr.write(`${name} is required\n`);
    process.exit(2);
  }
  return v;
};

const concurrency = Number(env('GW_CONCURRENCY', '10'));
const batched = env('GW_BATCHED', '0') === '1';
const localQueueSize = Number(env('GW_LOCAL_QUEUE_SIZE', '500'));
const assignUrl = `${env('QISCUS_BASE_URL')}/api/v1/admin/service/assign_agent`;
const headers = {
  'content-type': 'application/json',
  'Qiscus-App-Id': env('QISCUS_APP_ID'),
  'Qiscus-Secret-Key': env('QISCUS_SECRET_KEY'),
};

const logger = new Logger(() => (level: LogLevel, message: string) => {
  if (level === 'error' || level === 'warning') process.stderr.write(`[graphile-worker ${level}] ${message}\n`);
});

const runner = await run({
  connectionString: env('DATABASE_URL'),
  concurrency,
  maxPoolSize: concurrency + 2,
  noHandleSignals: true,
  logger,
  useNodeTime: batched,
  preset: batched
    ? { worker: { localQueue: { size: localQueueSize }, completeJobBatchDelay: 0, failJobBatchDelay: 0 } }
    : undefined,
  taskList: {
    async assign(payload) {
      const p = payload as { room_id: string; agent_id: number };
      const res = await fetch(assignUrl, {
        method: 'POST',
        headers,
        body: JSON.stringify({ room_id: p.room_id, agent_id: p.agent_id, max_agent: 1 }),
      });
      // Read the answer as the listener does (it records data.service.id).
      const body = (await res.json()) as { data?: { service?: { id?: number } } };
      if (!res.ok || typeof body.data?.service?.id !== 'number') throw new Error(`assign_agent answered ${res.status}`);
    },
  },
});
process.stdout.write('graphile-worker running\n');

let stopping = false;
const stop = () => {
  if (stopping) process.exit(1);
  stopping = true;
  void runner.stop().then(
    () => process.exit(0),
    () => process.exit(1),
  );
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
