/**
 * A listener's presence in PostgreSQL: an id from allocator.listener_ids, and the session-level advisory lock
 * (1365, id) held on a connection of its own. Reservations carry that id (sessions.owner); PostgreSQL drops the
 * lock the moment the connection or the process dies, and any listener's next probe (allocator.rescue_abandoned,
 * every second) then puts those reservations back, instead of waiting for their lease.
 *
 * If the connection breaks while we live (a PostgreSQL restart), we take a new id: the old one's reservations
 * are rescued like a dead listener's, which is safe (same agent first, and a late answer still confirms).
 */
import pg from 'pg';
import type { Logger } from '../log.ts';
import { errText } from './allocator-loop.ts';

export class Presence {
  private client: pg.Client | null = null;
  private current: number | null = null;
  private stopped = false;
  private connecting: Promise<void> | null = null;

  constructor(
    private readonly databaseUrl: string,
    private readonly logger: Logger,
    /** Called each time the listener is registered (again): it may reserve from now on. */
    private readonly onRegistered: () => void = () => {},
  ) {}

  /** The id to reserve under; null while not registered: the listener then reserves nothing (see AllocatorLoop). */
  get id(): number | null {
    return this.current;
  }

  /** Connects (retrying until it works or stop() is called). */
  start(): Promise<void> {
    this.connecting ??= this.connect().finally(() => (this.connecting = null));
    return this.connecting;
  }

  private async connect(): Promise<void> {
    // At most half a second between tries: the listener reserves nothing while it is not registered.
    for (let wait = 100; !this.stopped; wait = Math.min(wait * 2, 500)) {
      const client = new pg.Client({ connectionString: this.databaseUrl, application_name: 'allocator-listener-presence', keepAlive: true });
      client.on('error', () => this.lost(client));
      client.on('end', () => this.lost(client));
      try {
        await client.connect();
        const r = await client.query<{ id: number }>(`select nextval('allocator.listener_ids')::integer as id`);
        const id = r.rows[0]!.id;
        await client.query(`select pg_advisory_lock(1365, $1)`, [id]);
        if (this.stopped) {
          await client.end().catch(() => {});
          return;
        }
        this.client = client;
        this.current = id;
        this.logger.info({ listener: id }, 'listener registered');
        this.onRegistered();
        return;
      } catch (e) {
        await client.end().catch(() => {});
        this.logger.warn({ err: errText(e) }, `cannot register the listener yet; retrying in ${wait} ms`);
        await new Promise((r) => setTimeout(r, wait));
      }
    }
  }

  private lost(client: pg.Client): void {
    if (client !== this.client) return;
    this.client = null;
    this.current = null;
    if (this.stopped) return;
    this.logger.warn('listener presence connection lost; registering again');
    void this.start();
  }

  /** Ends the presence: our reservations (all reported by now, after a graceful stop) are no longer ours. */
  async stop(): Promise<void> {
    this.stopped = true;
    const c = this.client;
    this.client = null;
    this.current = null;
    await c?.end().catch(() => {});
  }
}
