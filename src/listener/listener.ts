/**
 * The listener process's wiring: NOTIFY wake-ups (pg-listen), catch-up on start and after every reconnect, a
 * periodic sweep (rescue expired leases, cancel rooms over the maximum wait, then look again), a timer for the next backoff to end, and the roster
 * sync. NOTIFY is only a hint; every path ends in AllocatorLoop.kick(), which re-reads the database.
 */
import pgListen, { type Subscriber } from 'pg-listen';
import type pg from 'pg';
import type { Logger } from '../log.ts';
import type { Config } from '../config/index.ts';
import type { ListenerMetrics } from './metrics.ts';
import { createQiscusClient, type QiscusClient } from '../qiscus/client.ts';
import { AllocatorLoop, errText, type LoopEvents } from './allocator-loop.ts';
import { Presence } from './presence.ts';
import { syncRoster, type SyncResult } from './roster-sync.ts';

// pg-listen is CommonJS with `exports.default`: from ESM its default import is the whole module.
const createSubscriber = pgListen.default;

export interface ListenerOptions extends LoopEvents {
  pool: pg.Pool;
  databaseUrl: string;
  qiscus: Pick<QiscusClient, 'assignAgent' | 'listAllAgents' | 'listAllDivisions' | 'listDivisionAgentIds'>;
  logger: Logger;
  concurrency: number;
  /** Seconds between sweeps; 0 turns the sweep off (NOTIFY and timers only). */
  sweepSeconds: number;
  /** Seconds between roster syncs. */
  syncSeconds: number;
  onSync?(r: SyncResult): void;
  onSyncError?(e: unknown): void;
  /** Reservations of dead listeners put back by this one's probe. */
  onRescued?(n: number): void;
  /** Qiscus went down (every call failing: see db/code/09-qiscus-health.sql) or came back. */
  onQiscusStatus?(down: boolean): void;
}

export interface Listener {
  loop: AllocatorLoop;
  /** Stops taking new work and waits for calls in flight (bounded by the Qiscus timeout). */
  stop(): Promise<void>;
  /** Hands in-flight reservations back to the queue now (second Ctrl-C). */
  abandon(): Promise<void>;
  syncNow(): Promise<SyncResult | undefined>;
}

export async function startListener(o: ListenerOptions): Promise<Listener> {
  const log = o.logger;
  // registered (again): the loop, which reserves nothing without an id, may start
  const presence = new Presence(o.databaseUrl, log, () => loop.kick());
  const loop = new AllocatorLoop({
    ...o,
    owner: () => presence.id,
    onOutcome: (r, outcome, ms, error) => {
      o.onOutcome?.(r, outcome, ms, error);
      // A failed call puts its room back with a backoff: wake when it ends, not at the next sweep.
      if (outcome !== 'assigned') void armDueTimer();
    },
  });
  const timers: NodeJS.Timeout[] = [];
  let dueTimer: NodeJS.Timeout | null = null;
  let stopped = false;

  // Wake up when the next backoff ends or lease expires, so a retry does not wait for the sweep.
  const armDueTimer = async () => {
    try {
      const r = await o.pool.query<{ t: Date | null }>(`select allocator.next_due_at() as t`);
      const t = r.rows[0]?.t;
      if (dueTimer) clearTimeout(dueTimer);
      dueTimer = null;
      if (t && !stopped) {
        const ms = Math.max(0, Math.min(t.getTime() - Date.now() + 20, 2 ** 31 - 1));
        dueTimer = setTimeout(() => void sweep(), ms);
      }
    } catch {
      // the sweep (or a reconnect) will come back here
    }
  };

  const sweep = async () => {
    if (stopped) return;
    try {
      const r = await o.pool.query<{ rescued: number; cancelled: number; pruned: number }>(`select * from allocator.sweep()`);
      const { rescued, cancelled, pruned } = r.rows[0]!;
      if (pruned > 0) log.debug({ pruned }, 'deleted history older than retention_days');
      if (rescued > 0) log.warn({ rescued }, 'rescued reservations whose lease expired');
      if (cancelled > 0) log.warn({ cancelled }, 'cancelled rooms that waited longer than max_wait_seconds');
    } catch (e) {
      log.warn({ err: errText(e) }, 'sweep failed');
    }
    loop.kick();
    await armDueTimer();
  };

  // Every second: put back the reservations of listeners that died (their advisory lock is gone), and notice
  // Qiscus going down or coming back. One short statement.
  let qiscusDown = false;
  let databaseFailing = false;
  const probe = async () => {
    if (stopped) return;
    try {
      const r = await o.pool.query<{ rescued: number; down: boolean; uncertain: boolean }>(
        `select allocator.rescue_abandoned() as rescued,
                (select down_since is not null from allocator.qiscus_health) as down,
                allocator.evidence_pull_due() as uncertain`,
      );
      if (databaseFailing) {
        // PostgreSQL is back (a restart, a failover): serve now, not when LISTEN has reconnected
        databaseFailing = false;
        log.info('PostgreSQL reachable again');
        void sweep();
      }
      const { rescued, down, uncertain } = r.rows[0]!;
      if (uncertain) pullForEvidence();
      if (rescued > 0) {
        log.warn({ rescued }, 'rescued the reservations of a listener that died');
        o.onRescued?.(rescued);
        loop.kick();
      }
      if (down !== qiscusDown) {
        qiscusDown = down;
        if (down) log.error('Qiscus is down: every assign call fails; probing it once a second, rooms keep their attempts');
        else log.info('Qiscus is back: serving the waiting rooms');
        o.onQiscusStatus?.(down);
      }
    } catch (e) {
      databaseFailing = true;
      log.debug({ err: errText(e) }, 'rescue probe failed');
    }
  };

  // A room waiting only because a count is held for want of evidence (allocator.evidence_pull_due) is served after
  // the next pull: pull again as soon as the last one is half a second old, or twice its duration for a roster of
  // many pages (so that pulls never take more than a third of Qiscus's time for the list), instead of at the next
  // scheduled sync. Found by the probe (every second) or right after a pull, which may have been ambiguous itself
  // (calls in flight while it ran); a pull not yet allowed is armed for the moment it is, and asks again then: a
  // pull by another listener meanwhile may have settled it.
  let syncing = false;
  let lastSyncStart = 0;
  let lastSyncMs = 0;
  let evidenceTimer: NodeJS.Timeout | null = null;
  const pullForEvidence = () => {
    if (syncing || evidenceTimer || stopped) return;
    const wait = lastSyncStart + Math.min(o.syncSeconds * 1000, Math.max(500, 2 * lastSyncMs)) - Date.now();
    if (wait <= 0) {
      void syncNow();
      return;
    }
    evidenceTimer = setTimeout(() => {
      evidenceTimer = null;
      void evidenceCheck();
    }, wait);
  };
  const evidenceCheck = async () => {
    const due = await o.pool
      .query<{ due: boolean }>(`select allocator.evidence_pull_due() as due`)
      .then((r) => r.rows[0]?.due === true, () => false);
    if (due) pullForEvidence();
  };

  let divisionsFailing = false;
  // A failed pull (Qiscus or PostgreSQL unreachable, as when both start together) is tried again after 1, 2, 4 ...
  // seconds, never later than the next scheduled pull: a listener that starts before Qiscus answers must not wait
  // a whole AGENT_SYNC_SECONDS for its first roster.
  let syncFailures = 0;
  let syncRetry: NodeJS.Timeout | null = null;
  const syncNow = async (): Promise<SyncResult | undefined> => {
    if (syncing) return undefined;
    syncing = true;
    lastSyncStart = Date.now();
    try {
      const r = await syncRoster(o.pool, o.qiscus);
      o.onSync?.(r);
      log.debug(r, 'roster synced');
      // Said once when it starts failing and once when it works again, not every sync.
      if (r.divisionError && !divisionsFailing) {
        log.warn({ err: r.divisionError }, 'division pull failed; keeping the last complete membership');
      } else if (!r.divisionError && divisionsFailing) log.info({ divisions: r.divisions }, 'division pull works again');
      divisionsFailing = r.divisionError !== undefined;
      syncFailures = 0;
      loop.kick();
      void evidenceCheck();
      return r;
    } catch (e) {
      o.onSyncError?.(e);
      const retryMs = Math.min(1000 * 2 ** syncFailures++, o.syncSeconds * 1000);
      log.warn({ err: errText(e), retryMs }, 'roster sync failed; keeping the last known roster');
      if (!stopped && syncRetry === null) {
        syncRetry = setTimeout(() => {
          syncRetry = null;
          void syncNow();
        }, retryMs);
      }
      return undefined;
    } finally {
      syncing = false;
      lastSyncMs = Date.now() - lastSyncStart;
    }
  };

  const newSubscriber = (): Subscriber => {
    const sub = createSubscriber(
      { connectionString: o.databaseUrl },
      {
        // pg-listen gives up after 3 s by default; a PostgreSQL restart or failover can take minutes. Never give
        // up; try twice a second at most (a refused connection costs nothing), so that the wake-ups are back within
        // half a second of the database.
        retryLimit: Infinity,
        retryTimeout: Infinity,
        retryInterval: (attempt) => Math.min(100 * 2 ** attempt, 500),
        paranoidChecking: 5000,
        parse: (s) => s, // payloads are plain words ("room", "agent"), not JSON
      },
    );
    sub.notifications.on('allocator', () => loop.kick());
    sub.events.on('connected', () => {
      log.info('listening for allocator notifications');
      void sweep(); // catch up on whatever happened while we were away
    });
    sub.events.on('reconnect', (attempt) => {
      if (attempt === 1 || attempt % 10 === 0) log.warn({ attempt }, 'reconnecting to PostgreSQL for LISTEN');
    });
    sub.events.on('error', (e) => log.error({ err: errText(e) }, 'notification connection error'));
    return sub;
  };

  // The first connection may fail (database still starting). A pg-listen subscriber whose first connect() failed
  // cannot be connected again (its pg client is single-use), so each try gets a fresh one. Once connected,
  // pg-listen itself reconnects for as long as it takes.
  let subscriber: Subscriber | undefined;
  const connectFirst = async () => {
    for (let wait = 250; !stopped; wait = Math.min(wait * 2, 2000)) {
      const sub = newSubscriber();
      try {
        await sub.connect();
        await sub.listenTo('allocator');
        subscriber = sub;
        return;
      } catch (e) {
        await sub.close().catch(() => {});
        log.warn({ err: errText(e) }, `cannot LISTEN yet; retrying in ${wait} ms`);
        await new Promise((r) => setTimeout(r, wait));
      }
    }
  };

  // A roster another listener pulled less than a sync period ago is as fresh as the one a running listener serves
  // from between its pulls: serve at once and pull beside the first calls (a roster of 10,000 agents takes about a
  // second to pull). An older one, or none, is pulled first. Unreachable database: pull first, as before.
  const rosterFresh = await o.pool
    .query<{ fresh: boolean }>(`select allocator.roster_fresh($1) as fresh`, [o.syncSeconds])
    .then((r) => r.rows[0]?.fresh === true, () => false);
  if (rosterFresh) void syncNow();
  else await syncNow();
  await presence.start();
  await connectFirst();
  await probe(); // a listener that died just before we started holds nothing for long
  void sweep(); // LISTEN is in place now: anything queued before it is caught here
  timers.push(setInterval(() => void probe(), 1000));
  if (o.sweepSeconds > 0) timers.push(setInterval(() => void sweep(), o.sweepSeconds * 1000));
  timers.push(setInterval(() => void syncNow(), o.syncSeconds * 1000));

  return {
    loop,
    syncNow,
    async stop() {
      stopped = true;
      for (const t of timers) clearInterval(t);
      if (syncRetry) clearTimeout(syncRetry);
      if (evidenceTimer) clearTimeout(evidenceTimer);
      if (dueTimer) clearTimeout(dueTimer);
      await subscriber?.close().catch(() => {});
      await loop.stop();
      await presence.stop();
    },
    async abandon() {
      await loop.releaseInFlight();
    },
  };
}

/**
 * The listener as configured by the environment (used by `npm run listener` and `npm start`). With `metrics`, the
 * Qiscus client is instrumented and the hooks feed the metrics too.
 */
export async function startListenerFromConfig(
  config: Config,
  deps: { pool: pg.Pool; databaseUrl: string; logger: Logger; metrics?: ListenerMetrics } & LoopEvents,
): Promise<Listener> {
  const { logger, metrics, ...rest } = deps;
  const client = createQiscusClient({
    baseUrl: config.QISCUS_BASE_URL,
    appId: config.QISCUS_APP_ID!,
    secretKey: config.QISCUS_SECRET_KEY!,
    responseTimeoutMs: config.QISCUS_TIMEOUT_MS,
    maxSockets: config.LISTENER_CONCURRENCY + 2, // the pipeline, and the roster pull beside it
  });
  const listener = await startListener({
    ...rest,
    logger,
    qiscus: metrics ? metrics.instrument(client) : client,
    concurrency: config.LISTENER_CONCURRENCY,
    sweepSeconds: config.SWEEP_SECONDS,
    syncSeconds: config.AGENT_SYNC_SECONDS,
    onOutcome: (r, outcome, ms, error) => {
      logger.info(
        { room: r.room_id, agent: Number(r.agent_id), attempt: r.attempt, outcome, ms: Math.round(ms), error },
        'assignment',
      );
      metrics?.onOutcome(r, outcome, ms, error);
      deps.onOutcome?.(r, outcome, ms, error);
    },
    onReserved: (r, lagMs) => {
      metrics?.onReserved(r, lagMs);
      deps.onReserved?.(r, lagMs);
    },
    onSync: metrics?.onSync,
    onSyncError: metrics?.onSyncError,
    onRescued: metrics?.onRescued,
    onQiscusStatus: metrics?.onQiscusStatus,
  });
  metrics?.watch(listener.loop);
  return listener;
}
