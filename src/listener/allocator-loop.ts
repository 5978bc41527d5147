/**
 * The assignment pump: asks SQL for the next (room, agent) pair, calls Qiscus, reports the outcome back to SQL.
 * It decides nothing itself: the database picks the pair, counts attempts, computes backoff and rescues leases.
 *
 * Wake-ups come from anywhere (NOTIFY, start, reconnect, sweep, a backoff ending): `kick()` is idempotent and
 * cheap, and one drain runs at a time per process, keeping up to `concurrency` Qiscus calls in flight.
 */
import type pg from 'pg';
import { isConnectionError } from '../db/errors.ts';
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
  /** This listener's id (see presence.ts); reservations made under it are rescued at once if it dies. */
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

  constructor(private readonly o: AllocatorLoopOptions) {}

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
        while (!this.stopped && this.inFlight.size < this.o.concurrency) {
          const r = await this.reserve();
          if (!r) break;
          this.start(r);
        }
      } while (this.again && !this.stopped && this.inFlight.size < this.o.concurrency);
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

  private async reserve(): Promise<Reservation | undefined> {
    const res = await this.o.pool.query<Reservation>(
      `select attempt_id, session_id, room_id, agent_id, attempt from allocator.reserve($1)`,
      [this.o.owner()],
    );
    const r = res.rows[0];
    if (r && this.kickedAt !== null) {
      this.o.onReserved?.(r, performance.now() - this.kickedAt);
      this.kickedAt = null;
    }
    return r;
  }

  private start(r: Reservation): void {
    const p = this.assign(r)
      .catch((e) => {
        // A bug, not an outage (those are retried in report()). The lease will hand the room back.
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
    let outcome: Outcome;
    let error: string | undefined;
    try {
      const answer = await this.o.qiscus.assignAgent(r.room_id, Number(r.agent_id));
      const current = await this.report<boolean>(`select allocator.confirm($1, $2) as v`, [
        r.attempt_id,
        answer.serviceId,
      ]);
      outcome = current ? 'assigned' : 'stale';
    } catch (e) {
      error = errText(e);
      if (isQiscusError(e) && e.kind === 'rejected') {
        outcome = 'refused';
        await this.report(`select allocator.fail_for_agent($1, $2) as v`, [r.attempt_id, error]);
      } else if (isQiscusError(e) && e.kind === 'config') {
        // Not the room's fault: hand it back without using up an attempt, and shout.
        outcome = 'released';
        this.o.logger.error(
          { status: e.status, err: error },
          'Qiscus rejected our credentials: check QISCUS_APP_ID and QISCUS_SECRET_KEY',
        );
        await this.report(`select allocator.release_reservation($1, $2, 30) as v`, [r.attempt_id, error]);
      } else {
        outcome = 'transient';
        const retryAfter = isQiscusError(e) ? (e.retryAfterSeconds ?? null) : null;
        await this.report(`select allocator.fail_transient($1, $2, $3, $4) as v`, [
          r.attempt_id,
          error,
          retryAfter === null ? null : Math.ceil(retryAfter),
          maybeAssigned(e),
        ]);
      }
    }
    this.o.onOutcome?.(r, outcome, performance.now() - t0, error);
  }

  /**
   * Reports an outcome to SQL, retrying while the database is unreachable: the result of a call that Qiscus
   * answered must not be lost. If this process dies first, its reservations are rescued (presence.ts) and the
   * room is retried with the same agent, which Qiscus treats as a repeat.
   */
  private async report<T>(sql: string, params: unknown[]): Promise<T> {
    for (let wait = 200; ; wait = Math.min(wait * 2, 5000)) {
      try {
        const res = await this.o.pool.query(sql, params);
        return res.rows[0]?.v as T;
      } catch (e) {
        if (!isConnectionError(e)) throw e;
        // Shutting down with the database gone (Ctrl-C reaches an embedded PostgreSQL too): leave the reservation
        // to its lease. After a restart it is rescued and retried with the same agent, which Qiscus treats as a
        // repeat, so nothing is lost.
        if (this.stopped) throw new Error(`database gone during shutdown; left to the lease: ${errText(e)}`);
        this.o.logger.warn({ err: errText(e) }, `database unreachable; retrying the report in ${wait} ms`);
        await new Promise((r) => setTimeout(r, wait));
      }
    }
  }

  /** Stops reserving and waits for the calls in flight to finish and be reported (each is bounded by its timeout). */
  async stop(): Promise<void> {
    this.stopped = true;
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

export function errText(e: unknown): string {
  if (e instanceof Error) return e.message || e.name;
  return String(e);
}
