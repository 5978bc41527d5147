/**
 * The queue as PostgreSQL sees it, read at scrape time: rooms waiting, the oldest wait, agents free/full/offline,
 * the oldest open snapshot.
 *
 * The database is the truth and any number of web and listener processes share it, so these gauges are not kept
 * in memory: each scrape runs one query on `allocator.stats_live`, shared by all the gauges of that scrape. Every
 * scrape target (web or listener) gives the same queue view; aggregate them with max(), not sum().
 *
 * A scrape must not hang on a slow or absent database: the read is bounded by `timeoutMs`. When it fails, the
 * queue gauges are left out of the answer (no stale or made-up zeros) and `allocator_database_up` is 0.
 */
import type pg from 'pg';
import { Gauge, type Registry } from 'prom-client';
import type { Logger } from '../log.ts';
import { PREFIX } from './registry.ts';

interface QueueSnapshot {
  waiting: number;
  backingOff: number;
  /** Seconds the oldest waiting room has waited; 0 when none waits. */
  oldestWaitSeconds: number;
  assigning: number;
  assignedOpen: number;
  agentsFree: number;
  agentsFull: number;
  agentsOffline: number;
  capacityOnline: number;
  loadOnline: number;
  /** Seconds the oldest open snapshot of the cluster has held back the cleanup of old row versions; 0 when none. */
  oldestSnapshotSeconds: number;
}

const SNAPSHOT_SQL = `
  select waiting::float8                                       as "waiting",
         backing_off::float8                                   as "backingOff",
         coalesce(extract(epoch from oldest_wait), 0)::float8  as "oldestWaitSeconds",
         assigning::float8                                     as "assigning",
         assigned_open::float8                                 as "assignedOpen",
         agents_free::float8                                   as "agentsFree",
         agents_full::float8                                   as "agentsFull",
         agents_offline::float8                                as "agentsOffline",
         capacity_online::float8                               as "capacityOnline",
         load_online::float8                                   as "loadOnline",
         coalesce(extract(epoch from oldest_snapshot), 0)::float8 as "oldestSnapshotSeconds"
  from allocator.stats_live`;

export interface QueueMetricsOptions {
  /** Longest a scrape waits for the database (connection included). Default 2000 ms. */
  timeoutMs?: number;
  /** Told once when the database stops answering scrapes, and once when it is back. */
  logger?: Logger;
}

/** A gauge whose value comes from the shared snapshot, and which says nothing when there is none. */
class SnapshotGauge<L extends string> extends Gauge<L> {
  constructor(
    config: { name: string; help: string; labelNames?: readonly L[]; registers: Registry[] },
    private readonly read: () => Promise<QueueSnapshot | null>,
    private readonly fill: (g: Gauge<L>, s: QueueSnapshot) => void,
  ) {
    super(config);
  }

  override async get() {
    const snap = await this.read();
    if (snap) this.fill(this, snap);
    const metric = await super.get();
    return snap ? metric : { ...metric, values: [] };
  }
}

export function registerQueueMetrics(registry: Registry, pool: pg.Pool, opts: QueueMetricsOptions = {}): void {
  const timeoutMs = opts.timeoutMs ?? 2000;
  let up = true;
  // One query per scrape: the gauges' get() calls of one scrape start together and share the read under way.
  let current: Promise<QueueSnapshot | null> | null = null;
  // A query that outlived its scrape's timeout is reused by the next scrape rather than joined by another one, so
  // a slow database never has more than one of our queries (and pool connections) at a time.
  let running: Promise<QueueSnapshot> | null = null;

  const query = (): Promise<QueueSnapshot> =>
    (running ??= pool
      .query<QueueSnapshot>(SNAPSHOT_SQL)
      .then((res) => {
        const row = res.rows[0];
        if (!row) throw new Error('allocator.stats_live returned no row');
        return row;
      })
      .finally(() => {
        running = null;
      }));

  const read = (): Promise<QueueSnapshot | null> =>
    (current ??= withTimeout(query(), timeoutMs)
      .then(
        (snap) => {
          if (!up) opts.logger?.info('metrics: database answers again');
          up = true;
          return snap;
        },
        (err: unknown) => {
          if (up) opts.logger?.warn({ err: String((err as Error)?.message ?? err) }, 'metrics: cannot read the queue');
          up = false;
          return null;
        },
      )
      .finally(() => {
        current = null;
      }));

  const gauge = <L extends string>(
    name: string,
    help: string,
    fill: (g: Gauge<L>, s: QueueSnapshot) => void,
    labelNames?: readonly L[],
  ) =>
    new SnapshotGauge<L>(
      // prom-client takes an explicit `labelNames: undefined` as a value: only pass it when there are labels.
      { name: PREFIX + name, help, registers: [registry], ...(labelNames ? { labelNames } : {}) },
      read,
      fill,
    );

  new Gauge({
    name: `${PREFIX}database_up`,
    help: '1 if the last scrape could read the queue from PostgreSQL, else 0 (and the queue gauges are left out)',
    registers: [registry],
    async collect() {
      this.set((await read()) ? 1 : 0);
    },
  });
  gauge('rooms_waiting', 'Rooms waiting for an agent (allocator.queue), backing-off ones included', (g, s) =>
    g.set(s.waiting),
  );
  gauge('rooms_backing_off', 'Waiting rooms whose next attempt is in the future (after a transient failure)', (g, s) =>
    g.set(s.backingOff),
  );
  gauge('oldest_wait_seconds', 'How long the oldest waiting room has waited; 0 when none waits', (g, s) =>
    g.set(s.oldestWaitSeconds),
  );
  gauge('rooms_assigning', 'Rooms reserved for an agent, the Qiscus call under way', (g, s) => g.set(s.assigning));
  gauge('rooms_assigned_open', 'Rooms assigned by us and not yet resolved', (g, s) => g.set(s.assignedOpen));
  gauge(
    'agents',
    'Agents by state: free (online, below capacity), full (online, at capacity), offline (unavailable, forced offline or paused)',
    (g, s) => {
      g.set({ state: 'free' }, s.agentsFree);
      g.set({ state: 'full' }, s.agentsFull);
      g.set({ state: 'offline' }, s.agentsOffline);
    },
    ['state'] as const,
  );
  gauge('capacity_online', 'Sum of the capacity of online agents (room slots)', (g, s) => g.set(s.capacityOnline));
  gauge('load_online', 'Rooms held by online agents (ours and assigned by hand)', (g, s) => g.set(s.loadOnline));
  gauge(
    'oldest_snapshot_seconds',
    'How long the oldest open transaction snapshot in the cluster has held back the cleanup of old row versions; 0 when none',
    (g, s) => g.set(s.oldestSnapshotSeconds),
  );
}

function withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer from the database within ${ms} ms`)), ms);
  });
  // The query, if it outlives the timeout, finishes in the background and its connection goes back to the pool.
  p.catch(() => {});
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}
