/**
 * Reports outcomes of assign calls to SQL in batches (group commit): the outcomes that finish while one
 * allocator.report() call runs go together in the next one. Each caller's promise settles only once its outcome
 * is committed, so nothing is forgotten before it is durable; if the process dies first, the reservation is
 * rescued (see presence.ts) and retried with the same agent, which Qiscus treats as a repeat.
 */
import type pg from 'pg';
import type { Logger } from '../log.ts';
import { isConnectionError } from '../db/errors.ts';

export type OutcomeReport =
  | { attempt: string; outcome: 'assigned'; service: number | null }
  | {
      attempt: string;
      outcome: 'transient';
      reason: string;
      retry_after: number | null;
      maybe_assigned: boolean;
      /** No answer came (a timeout, a dropped connection): Qiscus may still apply the call (attempts.unanswered). */
      unanswered: boolean;
    }
  | { attempt: string; outcome: 'refused'; reason: string }
  | { attempt: string; outcome: 'released'; reason: string; delay: number; maybe_assigned: boolean };

interface Pending {
  report: OutcomeReport;
  resolve(result: string | null): void;
  reject(e: unknown): void;
}

/** The most outcomes in one statement: bounds the statement's locks and its time. */
const MAX_BATCH = 100;

export class Reporter {
  private queue: Pending[] = [];
  private flushing = false;
  /** Set when shutting down: a report that cannot reach the database gives up instead of retrying forever. */
  stopping = false;

  constructor(
    private readonly pool: pg.Pool,
    private readonly logger: Logger,
  ) {}

  /** Records one outcome; resolves with its SQL function's result (confirm: 'true'/'false'; else the new state). */
  report(report: OutcomeReport): Promise<string | null> {
    return new Promise((resolve, reject) => {
      this.queue.push({ report, resolve, reject });
      if (!this.flushing) void this.flush();
    });
  }

  private async flush(): Promise<void> {
    this.flushing = true;
    try {
      while (this.queue.length > 0) {
        const batch = this.queue.splice(0, MAX_BATCH);
        try {
          const results = await this.send(batch.map((p) => p.report));
          for (const p of batch) p.resolve(results.get(p.report.attempt) ?? null);
        } catch (e) {
          for (const p of batch) p.reject(e);
        }
      }
    } finally {
      this.flushing = false;
    }
  }

  /** One allocator.report() call, retried while the database is unreachable or a deadlock victim. */
  private async send(reports: OutcomeReport[]): Promise<Map<string, string | null>> {
    // At most half a second between tries: the calls waiting here fill the pipeline, and the listener serves
    // again only when they are reported (a failed connection costs nothing; said once, then every 20th try).
    for (let wait = 100, tries = 1; ; wait = Math.min(wait * 2, 500), tries++) {
      try {
        const res = await this.pool.query<{ attempt_id: string; result: string | null }>(
          `select attempt_id, result from allocator.report($1::jsonb)`,
          [JSON.stringify(reports)],
        );
        return new Map(res.rows.map((r) => [r.attempt_id, r.result]));
      } catch (e) {
        const deadlock = (e as { code?: string }).code === '40P01';
        if (!deadlock && !isConnectionError(e)) throw e;
        // Shutting down with the database gone (Ctrl-C reaches an embedded PostgreSQL too): leave the
        // reservations to the rescue after the restart; nothing is lost.
        if (this.stopping && !deadlock) throw new Error(`database gone during shutdown; left to the rescue: ${(e as Error).message}`);
        if (tries === 1 || tries % 20 === 0) {
          this.logger.warn({ err: (e as Error).message, outcomes: reports.length, tries }, `could not report; retrying every ${wait} ms or less`);
        }
        await new Promise((r) => setTimeout(r, wait));
      }
    }
  }
}
