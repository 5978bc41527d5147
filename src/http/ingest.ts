/**
 * Group commit for the webhooks: those of one kind that arrive while a call to the database runs go together in
 * the next one (allocator.accept_requests), up to MAX_IN_FLIGHT calls of a kind at once. The allocation webhook is
 * the bulk of the traffic (Qiscus sends it on every customer message); resolutions come in bursts when agents are
 * quick (one per assignment), and one call each made them queue for the pool at the drain's rate. Each request
 * still waits for its own row to be committed and gets its own outcome; one that fails in SQL fails alone. A lone
 * webhook goes at once, so a quiet service answers as fast as before.
 *
 * A batch that loses a lock conflict (deadlock, serialization failure) is sent again, a few times: that is the
 * database being busy, not away, and Qiscus would otherwise get a 503 for a webhook that can be applied.
 */
import type pg from 'pg';
import { isLockConflict } from '../db/errors.ts';

export type WebhookKind = 'new_request' | 'close_request';

export interface AcceptRow {
  outcome: string;
  session_id: string | null;
  webhook_id: string;
}

interface Pending {
  roomId: string;
  /** Times its batch lost a lock conflict. */
  conflicts: number;
  payload: unknown;
  requestId: string;
  resolve(row: AcceptRow): void;
  reject(e: unknown): void;
}

/** An error from SQL for one webhook of a batch, shaped like pg's (code + severity) so it classifies the same. */
class RowError extends Error {
  readonly severity = 'ERROR';
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

/**
 * Calls of one kind at once. Allocation webhooks: two, one being written while the next gathers and goes, so that
 * a batch waiting on a lock (a DBA's open transaction on an agent a returning customer's room needs) does not hold
 * up the rest. More made the batches smaller and each webhook dearer: at 64 webhooks in flight, 1/2/3/4/8 calls at
 * once took 0.052/0.063/0.079/0.093/0.118 ms of PostgreSQL CPU per webhook, and 2 answered 1.08 x the webhooks per
 * second of the plain service where 4 answered 0.95 x and 8 0.77 x (bench/ingest.ts). Resolutions stay at four:
 * they are applied one after another within their batch, holding their rooms' sessions and agents, so a larger
 * batch holds those locks longer against the listeners' reports (not measured otherwise).
 */
const MAX_IN_FLIGHT: Record<WebhookKind, number> = { new_request: 2, close_request: 4 };

/** How many times a webhook is sent again after its batch lost a lock conflict, before it is answered 503. */
const CONFLICT_RETRIES = 3;

export class WebhookBatcher {
  private queue: Pending[] = [];
  private inFlight = 0;

  constructor(
    private readonly pool: pg.Pool,
    private readonly kind: WebhookKind,
    private readonly maxInFlight = MAX_IN_FLIGHT[kind],
    private readonly maxBatch = 200,
  ) {}

  accept(roomId: string, payload: unknown, requestId: string): Promise<AcceptRow> {
    return new Promise((resolve, reject) => {
      this.queue.push({ roomId, payload, requestId, conflicts: 0, resolve, reject });
      this.pump();
    });
  }

  /** Back in the queue after a lost lock conflict, or rejected with it once it has had its retries. */
  private retryOrReject(p: Pending, e: unknown): void {
    if (isLockConflict(e) && p.conflicts < CONFLICT_RETRIES) {
      p.conflicts += 1;
      this.queue.push(p);
    } else {
      p.reject(e);
    }
  }

  private pump(): void {
    while (this.inFlight < this.maxInFlight && this.queue.length > 0) {
      const batch = this.queue.splice(0, this.maxBatch);
      this.inFlight += 1;
      void this.send(batch).finally(() => {
        this.inFlight -= 1;
        this.pump();
      });
    }
  }

  private async send(batch: Pending[]): Promise<void> {
    // Rooms in one order in every batch of both kinds (stable: a room's webhooks keep their order): the lock order
    // that keeps batches from deadlocking (see accept_requests).
    const ordered = [...batch].sort((a, b) => (a.roomId < b.roomId ? -1 : a.roomId > b.roomId ? 1 : 0));
    let rows: Array<AcceptRow & { error_code: string | null; error: string | null }>;
    try {
      const res = await this.pool.query(
        `select outcome, session_id, webhook_id, error_code, error
         from allocator.accept_requests($1::text, $2::jsonb) order by ord`,
        [this.kind, JSON.stringify(ordered.map((p) => ({ payload: p.payload, request_id: p.requestId })))],
      );
      rows = res.rows;
    } catch (e) {
      for (const p of ordered) this.retryOrReject(p, e);
      return;
    }
    ordered.forEach((p, i) => {
      const row = rows[i];
      if (!row) p.reject(new Error('allocator.accept_requests returned too few rows'));
      else if (row.error_code) this.retryOrReject(p, new RowError(row.error_code, row.error ?? 'error'));
      else p.resolve({ outcome: row.outcome, session_id: row.session_id, webhook_id: row.webhook_id });
    });
  }
}
