/**
 * Group commit for the allocation webhook, the bulk of the traffic (Qiscus sends it on every customer message):
 * the webhooks that arrive while a call to the database runs go together in the next one
 * (allocator.accept_new_requests), up to `maxInFlight` calls at once. Each request still waits for its own row to
 * be committed and gets its own outcome; one that fails in SQL fails alone. A lone webhook goes at once, so a quiet
 * service answers as fast as before.
 */
import type pg from 'pg';

export interface AcceptRow {
  outcome: string;
  session_id: string | null;
  webhook_id: string;
}

interface Pending {
  roomId: string;
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

export class NewRequestBatcher {
  private queue: Pending[] = [];
  private inFlight = 0;

  constructor(
    private readonly pool: pg.Pool,
    private readonly maxInFlight = 4,
    private readonly maxBatch = 200,
  ) {}

  accept(roomId: string, payload: unknown, requestId: string): Promise<AcceptRow> {
    return new Promise((resolve, reject) => {
      this.queue.push({ roomId, payload, requestId, resolve, reject });
      this.pump();
    });
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
    // Rooms in one order in every batch (stable: a room's webhooks keep their order), so batches never deadlock.
    const ordered = [...batch].sort((a, b) => (a.roomId < b.roomId ? -1 : a.roomId > b.roomId ? 1 : 0));
    let rows: Array<AcceptRow & { error_code: string | null; error: string | null }>;
    try {
      const res = await this.pool.query(
        `select outcome, session_id, webhook_id, error_code, error from allocator.accept_new_requests($1::jsonb) order by ord`,
        [JSON.stringify(ordered.map((p) => ({ payload: p.payload, request_id: p.requestId })))],
      );
      rows = res.rows;
    } catch (e) {
      for (const p of ordered) p.reject(e);
      return;
    }
    ordered.forEach((p, i) => {
      const row = rows[i];
      if (!row) p.reject(new Error('allocator.accept_new_requests returned too few rows'));
      else if (row.error_code) p.reject(new RowError(row.error_code, row.error ?? 'error'));
      else p.resolve({ outcome: row.outcome, session_id: row.session_id, webhook_id: row.webhook_id });
    });
  }
}
