/**
 * The assignment pump: asks SQL for the next (room, agent) pair, calls Qiscus, reports the outcome back to SQL.
 * It decides nothing itself: the database picks the pair, counts attempts, computes backoff and rescues leases.
 *
 * Wake-ups come from anywhere (NOTIFY, start, reconnect, sweep, a backoff ending): `kick()` is idempotent and
 * cheap, and one drain runs at a time per process, keeping up to `concurrency` Qiscus calls in flight.
 */
import type pg from 'pg';
import { Reporter } from './reporter.ts';
import type { Logger } from '../log.ts';
import { isQiscusError, type AssignResult } from '../qiscus/client.ts';

export interface Assigner {
  assignAgent(roomId: string, agentId: number): Promise<AssignResult>;
}

export interface Reservation {
  attempt_id: string;
  session_id: string;
  room_id: string;
  agent_id: string;
  attempt: number;
}

/** How a reservation ended, named as SQL records it in allocator.attempts.outcome. */
export type Outcome = 'assigned' | 'transient' | 'refused' | 'released' | 'stale';

export interface LoopEvents {
  /** One line per finished reservation (metrics and logs hang off this). */
  onOutcome?(r: Reservation, outcome: Outcome, ms: number, error?: string): void;
  /** Time from a wake-up to the reservation it led to (listener lag). */
  onReserved?(r: Reservation, lagMs: number): void;
}

export interface AllocatorLoopOptions extends LoopEvents {
  pool: pg.Pool;
  /** This listener's id (see presence.ts); reservations made under it are rescued at once if it dies. Nothing
   * is reserved while it is null. */
  owner: () => number | null;
  qiscus: Assigner;
  logger: Logger;
  concurrency: number;
}

export class AllocatorLoop {
  private inFlight = new Map<string, Promise<void>>();
  private draining = false;
  private again = false;
  private stopped = false;
  private kickedAt: number | null = null;
  private retryTimer: NodeJS.Timeout | null = null;
  private readonly reporter: Reporter;

  /** Free places in the pipeline worth a round trip (see drain). */
  private readonly minRefill: number;

  constructor(private readonly o: AllocatorLoopOptions) {
    this.reporter = new Reporter(o.pool, o.logger);
    this.minRefill = Math.max(1, Math.min(4, Math.floor(o.concurrency / 4)));
  }

  get busy(): number {
    return this.inFlight.size;
  }

  /** Something may be assignable: drain now (or right after the drain under way). */
  kick(): void {
    if (this.stopped) return;
    this.kickedAt ??= performance.now();
    if (this.draining) {
      this.again = true;
      return;
    }
    void this.drain();
  }

  private async drain(): Promise<void> {
    this.draining = true;
    try {
      do {
        this.again = false;
        // Refill the pipeline: one round trip reserves as many as there are free places in it. While it is nearly
        // full, wait for a quarter of it to free up: a reservation's round trip costs about as much for one room
        // as for four, and under a backlog this halves the round trips (the places wait one call at most).
        while (!this.stopped && this.o.concurrency - this.inFlight.size >= this.minRefill) {
          const asked = this.o.concurrency - this.inFlight.size;
          const batch = await this.reserve(asked);
          for (const r of batch) this.start(r);
          // Fewer than asked: nothing more could be reserved just now. Whatever changes that wakes us (a new room, a
          // freed slot or a passed-over agent NOTIFY; a backoff's end arms a timer), so no second round trip to hear
          // "none" (with free agents, one such per room: half of PostgreSQL's work for a room at a time).
          if (batch.length < asked) break;
        }
      } while (this.again && !this.stopped && this.o.concurrency - this.inFlight.size >= this.minRefill);
      this.kickedAt = null;
    } catch (e) {
      // The database is unreachable or restarting: look again in a second. Reconnects kick too.
      this.o.logger.warn({ err: errText(e) }, 'reserve failed; retrying in 1 s');
      this.retryTimer ??= setTimeout(() => {
        this.retryTimer = null;
        this.kick();
      }, 1000);
    } finally {
      this.draining = false;
    }
  }

  private async reserve(batch: number): Promise<Reservation[]> {
    // Not registered (starting, or PostgreSQL just restarted): reserve nothing. A reservation without an owner
    // could only be rescued by its lease if this process died now; registering again kicks the loop.
    const owner = this.o.owner();
    if (owner === null) return [];
    const res = await this.o.pool.query<Reservation>(
      `select attempt_id, session_id, room_id, agent_id, attempt from allocator.reserve($1, $2)`,
      [owner, batch],
    );
    const first = res.rows[0];
    if (first && this.kickedAt !== null) {
      for (const r of res.rows) this.o.onReserved?.(r, performance.now() - this.kickedAt);
      this.kickedAt = null;
    }
    return res.rows;
  }

  private start(r: Reservation): void {
    const p = this.assign(r)
      .catch((e) => {
        // A bug, not an outage (those are retried by the reporter). The rescue will hand the room back.
        this.o.logger.error({ err: errText(e), room: r.room_id, attempt: r.attempt_id }, 'could not report outcome');
      })
      .finally(() => {
        this.inFlight.delete(r.attempt_id);
        this.kick(); // a slot in our own pipeline is free (and maybe the agent's, on failure)
      });
    this.inFlight.set(r.attempt_id, p);
  }

  private async assign(r: Reservation): Promise<void> {
    const t0 = performance.now();
    const attempt = r.attempt_id;
    let outcome: Outcome;
    let error: string | undefined;
    try {
      const answer = await this.o.qiscus.assignAgent(r.room_id, Number(r.agent_id));
      const current = await this.reporter.report({ attempt, outcome: 'assigned', service: answer.serviceId });
      outcome = current === 'true' ? 'assigned' : 'stale';
    } catch (e) {
      error = errText(e);
      if (isQiscusError(e) && e.kind === 'rejected') {
        outcome = 'refused';
        await this.reporter.report({ attempt, outcome, reason: error });
      } else if (isQiscusError(e) && e.kind === 'config') {
        // Not the room's fault: hand it back without using up an attempt, and shout.
        outcome = 'released';
        this.o.logger.error(
          { status: e.status, err: error },
          'Qiscus rejected our credentials: check QISCUS_APP_ID and QISCUS_SECRET_KEY',
        );
        await this.reporter.report({ attempt, outcome, reason: error, delay: 30, maybe_assigned: false });
      } else {
        outcome = 'transient';
        const retryAfter = isQiscusError(e) ? (e.retryAfterSeconds ?? null) : null;
        await this.reporter.report({
          attempt,
          outcome,
          reason: error,
          retry_after: retryAfter === null ? null : Math.ceil(retryAfter),
          maybe_assigned: maybeAssigned(e),
          unanswered: unanswered(e),
        });
      }
    }
    this.o.onOutcome?.(r, outcome, performance.now() - t0, error);
  }

  /** Stops reserving and waits for the calls in flight to finish and be reported (each is bounded by its timeout). */
  async stop(): Promise<void> {
    this.stopped = true;
    this.reporter.stopping = true;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    await Promise.allSettled([...this.inFlight.values()]);
  }

  /** Hands every reservation still in flight back to the queue at once (a second Ctrl-C). */
  async releaseInFlight(reason = 'listener shutting down'): Promise<void> {
    this.stopped = true;
    // The calls are still out: Qiscus may yet perform them, so the rooms keep their agents' slots.
    await Promise.allSettled(
      [...this.inFlight.keys()].map((id) =>
        this.o.pool.query(`select allocator.release_reservation($1, $2, 0, true)`, [id, reason]),
      ),
    );
  }
}

/**
 * Could Qiscus have made the assignment although we saw a failure? Yes for a timeout, a dropped connection, a
 * 5xx or an unreadable 2xx; no when it told us to slow down (429) or we never reached it.
 */
export function maybeAssigned(e: unknown): boolean {
  if (!isQiscusError(e)) return true;
  if (e.status === 429) return false;
  return !['ECONNREFUSED', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH', 'ENETUNREACH'].includes(e.code ?? '');
}

/**
 * Did no answer come at all (a timeout, a dropped connection), so that Qiscus may still be working on the call and
 * apply it later? A proxy's 408, 504 or 524 (it gave up waiting for Qiscus) says the same. Any other answer means
 * the call is over, landed or not.
 */
export function unanswered(e: unknown): boolean {
  if (!maybeAssigned(e)) return false;
  if (!isQiscusError(e) || e.status === undefined) return true;
  return NO_ANSWER_STATUSES.includes(e.status);
}

/** HTTP statuses by which a proxy says it gave up waiting for Qiscus (see unanswered). */
export const NO_ANSWER_STATUSES: readonly number[] = [408, 504, 524];

export function errText(e: unknown): string {
  if (e instanceof Error) return e.message || e.name;
  return String(e);
}
