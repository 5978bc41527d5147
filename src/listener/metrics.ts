/**
 * The listener's metrics: assignment outcomes and durations, the lag from a wake-up to the reservation it led to,
 * Qiscus calls (see ../qiscus/metrics.ts), the roster sync, and the assignments in flight. Fed by the listener's
 * hooks.
 */
import { Counter, Gauge, Histogram, type Registry } from 'prom-client';
import { LATENCY_BUCKETS, PREFIX } from '../metrics/registry.ts';
import type { QiscusClient } from '../qiscus/client.ts';
import { createQiscusMetrics } from '../qiscus/metrics.ts';
import type { Outcome, Reservation } from './allocator-loop.ts';
import type { SyncResult } from './roster-sync.ts';

const OUTCOMES: readonly Outcome[] = ['assigned', 'transient', 'refused', 'released', 'stale'];

export interface ListenerMetrics {
  /** The listener hooks that feed the metrics (startListener's onOutcome, onReserved, onSync, onSyncError). */
  onOutcome(r: Reservation, outcome: Outcome, ms: number, error?: string): void;
  onReserved(r: Reservation, lagMs: number): void;
  onSync(r: SyncResult): void;
  onSyncError(e: unknown): void;
  onRescued(n: number): void;
  onQiscusStatus(down: boolean): void;
  /** Wraps the Qiscus client so that its calls are timed and its errors counted. */
  instrument(client: QiscusClient): QiscusClient;
  /** The loop whose in-flight assignments the gauge reports (read at scrape time). */
  watch(loop: { readonly busy: number }): void;
}

export function createListenerMetrics(registry: Registry): ListenerMetrics {
  const registers = [registry];
  const assignments = new Counter({
    name: `${PREFIX}assignments_total`,
    help: 'Finished reservations by outcome: assigned, transient (retried later), refused (Qiscus refused this agent), released (handed back unspent: Qiscus rejected our credentials), stale (the room was resolved meanwhile)',
    labelNames: ['outcome'] as const,
    registers,
  });
  const duration = new Histogram({
    name: `${PREFIX}assignment_duration_seconds`,
    help: 'From reservation to the outcome recorded in SQL (the Qiscus call and the report), by outcome',
    labelNames: ['outcome'] as const,
    buckets: LATENCY_BUCKETS,
    registers,
  });
  const lag = new Histogram({
    name: `${PREFIX}listener_lag_seconds`,
    help: 'From a wake-up (NOTIFY, sweep, timer) to the reservation it led to',
    buckets: [0.0005, ...LATENCY_BUCKETS],
    registers,
  });
  let loop: { readonly busy: number } | undefined;
  new Gauge({
    name: `${PREFIX}assignments_in_flight`,
    help: 'Reservations of this process whose Qiscus call or report is under way',
    registers,
    collect() {
      this.set(loop?.busy ?? 0);
    },
  });
  const syncs = new Counter({
    name: `${PREFIX}roster_syncs_total`,
    help: 'Pulls of the agent roster from Qiscus by result (ok, error)',
    labelNames: ['result'] as const,
    registers,
  });
  const rosterAgents = new Gauge({
    name: `${PREFIX}roster_agents`,
    help: 'Agents (all types) in the last roster pulled from Qiscus',
    registers,
  });
  const lastSync = new Gauge({
    name: `${PREFIX}roster_last_sync_timestamp_seconds`,
    help: 'Unix time of the last successful roster sync (alert when it falls far behind AGENT_SYNC_SECONDS)',
    registers,
  });

  const rescued = new Counter({
    name: `${PREFIX}rescued_total`,
    help: 'Reservations of dead listeners put back by this listener (their assign calls may have landed: retried with the same agent)',
    registers,
  });
  const qiscusUp = new Gauge({
    name: `${PREFIX}qiscus_up`,
    help: '0 while Qiscus fails every assign call (an outage: rooms keep their attempts, Qiscus is probed once a second), else 1',
    registers,
  });
  qiscusUp.set(1);

  // Every series exists from the start at 0, so rate() and alerts see the first increment.
  for (const outcome of OUTCOMES) assignments.inc({ outcome }, 0);
  syncs.inc({ result: 'ok' }, 0);
  syncs.inc({ result: 'error' }, 0);

  const qiscus = createQiscusMetrics(registry);

  return {
    onOutcome(_r, outcome, ms) {
      assignments.inc({ outcome });
      duration.observe({ outcome }, ms / 1000);
    },
    onReserved(_r, lagMs) {
      lag.observe(lagMs / 1000);
    },
    onSync(r) {
      syncs.inc({ result: 'ok' });
      rosterAgents.set(r.agents);
      lastSync.set(Date.now() / 1000);
    },
    onSyncError() {
      syncs.inc({ result: 'error' });
    },
    onRescued(n) {
      rescued.inc(n);
    },
    onQiscusStatus(down) {
      qiscusUp.set(down ? 0 : 1);
    },
    instrument: (client) => qiscus.instrument(client),
    watch(l) {
      loop = l;
    },
  };
}
