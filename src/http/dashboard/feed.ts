/**
 * The dashboard's data: one snapshot of the contact centre, read in one query, shared by every open page.
 *
 * Fifty open pages must cost the database what one does, and a closed dashboard nothing. So the feed takes a snapshot
 * once a second only while at least one page listens (an SSE stream), renders it once, and hands the same frame to
 * every listener. A page load or a tool's JSON request between two ticks gets the last frame; with nobody
 * listening, it takes one of its own (and concurrent requests share it).
 */
import type pg from 'pg';

/** Rooms listed on the page; the count of waiting rooms covers the rest. */
const QUEUE_ROWS = 100;

export interface QueueRow {
  position: number;
  room_id: string;
  source: string | null;
  /** Division names that may serve the room now; null: any agent may. */
  divisions: string[] | null;
  waited_seconds: number;
  attempts: number;
  last_error: string | null;
}

export type AgentStatus =
  | 'online'
  | 'paused'
  | 'unavailable in Qiscus'
  | 'forced offline in Qiscus'
  | 'not in the Qiscus roster';

export interface AgentRow {
  id: number;
  name: string;
  status: AgentStatus;
  load: number;
  capacity: number;
  /** Rooms Qiscus shows the agent holding that we did not assign (assigned by hand). */
  by_hand: number;
  paused: boolean;
  divisions: string[];
}

export interface Snapshot {
  /** Server time of the snapshot (ISO 8601). */
  at: string;
  qiscus: { status: 'up' | 'down'; down_since: string | null };
  waiting: number;
  longest_wait_seconds: number;
  assigned_last_minute: number;
  failures_last_hour: number;
  /** The first QUEUE_ROWS waiting rooms, in serving order. */
  queue: QueueRow[];
  agents: AgentRow[];
}

/**
 * Division ids to names, in the order given (an id the roster has not named yet shows as #id); null stays null.
 * Written into the query rather than kept as a function: the dashboard adds nothing to the database.
 */
const divisionNames = (ids: string) => `
  (select array_agg(coalesce(nullif(d.name, ''), '#' || x.id) order by x.n)
     from unnest(${ids}) with ordinality x(id, n) left join allocator.divisions d on d.id = x.id)`;

/**
 * The first $1 rows of allocator.queue, with the same columns and order. Not `select ... from allocator.queue limit
 * $1`: the view numbers every waiting room (row_number() over all of them) before a LIMIT can apply, a sort of the
 * whole queue every second while a page is open. Here the LIMIT walks the view's order on the sessions_queue index
 * and only those rows are numbered, which gives them the same positions. A test compares the two.
 */
const QUEUE_HEAD = `
  select row_number() over (order by s.priority desc, s.queued_at, s.id) as position,
         s.room_id, now() - s.queued_at as waited, s.attempts, s.last_error, s.source,
         case when s.overflow_at <= now() then null else s.division_ids end as division_ids
  from (select * from allocator.sessions where in_queue order by priority desc, queued_at, id limit $1) s`;

/**
 * One statement, so one round trip and one consistent view. Counts, not room ids, for the agents; nothing from the
 * webhook payloads (customer names, e-mails, messages) is read at all. Each part reads through an index: the queue
 * through sessions_queue (see QUEUE_HEAD), the longest wait through
 * sessions_waiting_since, the last minute and hour through sessions_assigned_at and attempts_finished_at.
 * Failures are the calls that did not land (transient, refused, lease expired); a room resolved or released
 * meanwhile is not one.
 */
const SNAPSHOT_SQL = `
  select json_build_object(
    'at', now(),
    'qiscus', (select json_build_object('status', q.status, 'down_since', q.down_since) from allocator.qiscus_status q),
    'waiting', (select count(*) from allocator.sessions where in_queue),
    'longest_wait_seconds',
      (select coalesce(extract(epoch from now() - min(queued_at)), 0)::float8
         from allocator.sessions where in_queue),
    'assigned_last_minute', (select count(*) from allocator.sessions where assigned_at >= now() - interval '1 minute'),
    'failures_last_hour',
      (select count(*) from allocator.attempts
        where finished_at >= now() - interval '1 hour' and outcome in ('transient', 'refused', 'expired')),
    'queue', coalesce((
      select json_agg(json_build_object(
               'position', q.position, 'room_id', q.room_id, 'source', q.source,
               'divisions', ${divisionNames('q.division_ids')},
               'waited_seconds', extract(epoch from q.waited)::float8,
               'attempts', q.attempts, 'last_error', q.last_error) order by q.position)
      from (${QUEUE_HEAD}) q), '[]'),
    'agents', coalesce((
      select json_agg(json_build_object(
               'id', l.id, 'name', l.name,
               'status', case when a.accepting then 'online'
                              when a.online then 'paused'
                              -- not online: why Qiscus may not give it rooms
                              when not a.present then 'not in the Qiscus roster'
                              when a.force_offline then 'forced offline in Qiscus'
                              else 'unavailable in Qiscus' end,
               'load', l.load, 'capacity', l.capacity, 'by_hand', l.external_load, 'paused', l.paused,
               'divisions', coalesce(${divisionNames('l.division_ids')}, '{}'))
             order by lower(l.name), l.id)
      from allocator.agent_load l
      join allocator.agents a on a.id = l.id
      -- Agents only (not admins or supervisors); one gone from Qiscus's roster while it still holds rooms stays.
      where a.type = 'agent' and (a.present or l.load > 0)), '[]')
  ) as snapshot`;

/** Reads one snapshot. */
export async function readSnapshot(pool: pg.Pool): Promise<Snapshot> {
  const res = await pool.query<{ snapshot: Snapshot }>(SNAPSHOT_SQL, [QUEUE_ROWS]);
  return res.rows[0]!.snapshot; // json: counts and ids arrive as numbers, not strings
}

/** A snapshot and what every page shows of it, rendered once; or why there is none. */
export interface Frame {
  snapshot?: Snapshot;
  error?: string;
  html: string;
  /** When it was taken (ms since the epoch, this process's clock). */
  takenAt: number;
}

export class Feed {
  private readonly listeners = new Set<(f: Frame) => void>();
  private timer: NodeJS.Timeout | undefined;
  private last: Frame | undefined;
  private taking: Promise<Frame> | undefined;
  /** Whether the last read failed: a database that stays away is logged once, not every second. */
  private failing = false;

  constructor(
    private readonly take: () => Promise<Snapshot>,
    private readonly render: (f: Omit<Frame, 'html'>) => string,
    private readonly intervalMs = 1000,
    /** Told when reads start failing (once until one succeeds again). */
    private readonly onError?: (err: unknown) => void,
  ) {}

  /**
   * The latest frame: while pages listen, the last tick's (at most one interval old); otherwise a fresh one, unless
   * the last is younger than one interval. Never throws: a failed read is a frame that says so.
   */
  current(): Promise<Frame> {
    const last = this.last;
    if (last && (this.timer || Date.now() - last.takenAt < this.intervalMs)) return Promise.resolve(last);
    return this.refresh();
  }

  /** After a write (a pause), the next request must not get the frame from before it. */
  invalidate(): void {
    this.last = undefined;
  }

  /** Calls `listener` with every new frame until the returned function is called. The first one starts the ticks. */
  subscribe(listener: (f: Frame) => void): () => void {
    this.listeners.add(listener);
    this.timer ??= setInterval(() => {
      // A read still under way (a slow database) is not joined by another: the listeners get it when it ends.
      if (!this.taking) void this.refresh();
    }, this.intervalMs);
    return () => {
      this.listeners.delete(listener);
      if (this.listeners.size === 0) this.stop();
    };
  }

  /** Stops the ticks and forgets every listener (the app is stopping). */
  stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
    this.listeners.clear();
  }

  private refresh(): Promise<Frame> {
    return (this.taking ??= this.take()
      .then(
        (snapshot) => {
          this.failing = false;
          return { snapshot, takenAt: Date.now() };
        },
        (err: unknown) => {
          if (!this.failing) this.onError?.(err);
          this.failing = true;
          return { error: 'the database does not answer; retrying every second', takenAt: Date.now() };
        },
      )
      .then((f) => {
        const frame: Frame = { ...f, html: this.render(f) };
        this.last = frame;
        for (const l of this.listeners) l(frame);
        return frame;
      })
      .finally(() => {
        this.taking = undefined;
      }));
  }
}
