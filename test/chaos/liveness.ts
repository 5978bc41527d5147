/**
 * The chaos run's liveness watch: whenever a room is waiting and an agent who may serve it has a free slot, an
 * assignment of that room must start within the bound (1 s, plus a margin for sampling and scheduling).
 *
 * "May serve" is routing by division (issue 13; routing.ts): the room's route, the first of the routes as the driver
 * last committed them that matches its source and channel.id, names divisions, and the agent is in one of them;
 * or no route matches; or the route's overflow time has passed (counted from the room's webhook 2xx, which comes
 * after its queued_at: the allocator's overflow is never later). A room whose divisions have no free agent is no
 * condition at all until it overflows. Membership is Qiscus's and the database's both (the allocator learns
 * Qiscus's at a roster pull): while they disagree on whether the agent may serve the room, the condition is
 * excused ("division membership not pulled yet", excuse 6); checking that pulls do bring it is routing.ts's.
 *
 * It judges from OUTSIDE the allocator, by what Qiscus (the simulator) and the customers (the driver) see, and
 * by the assign calls as they leave the listeners (the tap, qiscus-tap.ts). Every SAMPLE_MS it computes:
 *
 *   waiting rooms   the customer's session is open in Qiscus with no agent, its allocation webhook got a 2xx (so
 *                   the allocator knows it), and no assign call for it is in flight;
 *   free slots      per agent online in Qiscus: capacity − the rooms Qiscus shows it holding (Qiscus's count)
 *                     − assign calls to it still in flight for other rooms (the slot is promised; the call may land)
 *                     − rooms whose last call to it failed ambiguously (5xx, timeout, listener gone) and that wait
 *                       for their retry: Qiscus may yet show them on the agent, so the slot is held (invariant 9:
 *                       "a slot that may be taken counts as taken"), and the retry goes to that agent
 *                     − rooms Qiscus took off it by a resolution whose webhook has not had its 2xx yet (the
 *                       allocator cannot know yet; its count is right again the moment the webhook is stored);
 *                     − calls to it that got no answer (a timeout, a killed listener, or a listener whose presence
 *                       a PostgreSQL restart took while the call was out) and that Qiscus does not show: Qiscus
 *                       may yet apply them, until the call's lease ends, so a slot let go meanwhile is kept until
 *                       the first pull after that (invariant 9, the lease as the call's end; lateLandings);
 *   conditions      (room, agent) pairs: the room waits, the agent has a free slot, may serve it (above) and did
 *                   not refuse the room.
 *
 * A condition that lasts longer than BOUND_MS (1 s + 0.5 s for the 250 ms sampling and the scheduling of five
 * processes on a busy machine) outside the excused windows below is a violation: the run fails, naming the room,
 * the agent, the counts, and what the database said about both at that moment.
 *
 * The excuses, each a window during which a condition's clock is held at zero (it starts again when the window
 * ends, so the bound then applies in full). Nothing else is excused: not a poll, a lease, a sweep, a wait for a
 * roster pull beyond excuse 4, a hold without a failed call behind it, nor a backoff longer than the settings allow.
 *   1. PostgreSQL is down (stopped by the run): every condition, from the stop until it accepts connections again.
 *      Nothing can be reserved or reported meanwhile. The calls in flight or answered during the outage were made
 *      by listeners whose presence died with their connections, so their rooms and agents are excused for 2 s
 *      more, as a dead listener's (excuse 2).
 *   2. A listener was killed with kill -9: the rooms and agents of its reservations (read from the database right
 *      after the kill) and of the calls it had in flight (the tap sees them cut), for 2 s from the kill. That is
 *      invariant 8's bound for handing a dead listener's reservations to the others; the other listeners' rooms
 *      are not excused at all.
 *   3. Qiscus is failing the calls in question:
 *      a. the room's own last call failed transiently (5xx, 429, timeout): the room waits out its backoff, at most
 *         min(retry_max_seconds, retry_base_seconds · 2^(attempts − 1)) from the failure (attempts as the
 *         database counts them), and at least the 429's Retry-After;
 *      b. Qiscus is down for everyone by the allocator's own rule (the last outage_failures finished calls all
 *         failed transiently, over two rooms or more), until a call is answered again: then every room waits only
 *         for the probe (invariant 10), and once Qiscus answers, the bound applies in full;
 *      c. Qiscus is so slow that the calls in flight fill every serving listener's pipeline (LISTENER_CONCURRENCY,
 *         32 by default, calls each): no listener may start another call until one of them ends.
 *   4. A roster pull could not place a room of ours yet (invariant 9): when a pull reads Qiscus's count of an agent
 *      while a room of ours on that agent is not confirmed yet (its call in flight, answered but not reported, or
 *      failed ambiguously and waiting for its retry), the count cannot tell that room from one assigned by hand, so
 *      the safe side is kept: the agent's conditions are excused until the next pull, provided every room of ours
 *      that pull saw on the agent was confirmed before it started; that pull is the evidence invariant 9 names
 *      ("the first pull that started after the call ended"), and from it the bound applies in full. "Confirmed
 *      before it started" is judged from outside as "its 200 answered at least PULL_SLACK_MS before the pull's
 *      request reached Qiscus": the pull's start (sync_agents's started_at) comes a moment before its request, and
 *      the confirm a moment after the answer. On a loaded machine that moment can be longer, so the database's own
 *      claim counts too: an agent whose latest pull recorded a count above its lowest possible one (external_load
 *      above external_seen: rooms of ours in flight when the pull started), provided a call of ours to that agent
 *      was out in the PULL_WINDOW_MS before the pull's request. Either way the excuse ends at the next pull. At the
 *      shipped AGENT_SYNC_SECONDS (30) this can keep a free slot idle for up to a pull period per listener: counted
 *      and reported apart ("roster pull ambiguity").
 *   5. The machine, not the allocator: the chaos driver itself (which hosts the simulator and the tap) did not run
 *      for longer than STALL_MS between two samples (Qiscus was not answering then, and the watch was not
 *      watching), or the watch's own probe of the database (one plain SELECT of the open sessions, every sample,
 *      on a connection of its own, taking no lock the allocator takes) took longer than SLOW_DB_MS: no allocator
 *      can reserve, call and report within the bound while one statement takes half of it. This happens on a
 *      machine shared with other test suites (two cores for five service processes, PostgreSQL and the driver),
 *      and right after a PostgreSQL restart while it warms up. Counted and reported, so a run on a quiet machine
 *      shows none.
 *   6. Division membership not pulled yet: Qiscus and the database (the watch's probe) disagree on whether the
 *      agent is in one of the room's route's divisions. The allocator can only use what the last pull brought;
 *      that a pull brings each change, and when, is judged apart (routing.ts, judgeMembership).
 *
 * The watch also gives the run's settle time (from the moment the traffic and the faults stop until no room waits
 * with a free agent, apart from rooms still inside their own backoff of excuse 3a and membership changes the next
 * scheduled pull will bring, excuse 6) and the figures of the summary.
 */
import pg from 'pg';
import { DEFAULT_LISTENER_CONCURRENCY } from '../../src/config/index.ts';
import { NO_ANSWER_STATUSES } from '../../src/listener/allocator-loop.ts';
import type { Simulator } from '../../src/simulator/qiscus-simulator.ts';
import type { QiscusTap, TapCall } from './qiscus-tap.ts';
import { intersects, routeFor, type RouteRow } from './routing.ts';

export const SAMPLE_MS = 250;
/** Invariant 7's bound (1 s) plus the sampling and scheduling margin. */
export const BOUND_MS = 1500;
/** Invariant 8's bound: a dead listener's reservations are the others' within this. */
export const DEAD_LISTENER_MS = 2000;
/** A gap between two samples longer than this means the driver (simulator, tap, watch) itself stalled. */
export const STALL_MS = 500;
/** A probe of the database slower than this means the database (or the machine) was not answering. */
export const SLOW_DB_MS = 500;
/**
 * A room whose 200 was answered less than this before a pull's request reached Qiscus may not have been confirmed
 * when that pull started (its start precedes its request; the confirm follows the answer): excuse 4 treats it as a
 * room the pull could not place.
 */
export const PULL_SLACK_MS = 1000;
/** How far before a pull's request its start may lie on a loaded machine (for the database's own claim, below). */
const PULL_WINDOW_MS = 5000;
/** Calls in flight per listener: LISTENER_CONCURRENCY's default (the chaos run leaves it unset). */
const LISTENER_CONCURRENCY = DEFAULT_LISTENER_CONCURRENCY;

/** What the watch needs to know of a customer's room (the driver's Room has these fields). */
export interface RoomView {
  id: string;
  /** The driver's session number of the room (1, then +1 per returning customer). */
  sessions: number;
  state: 'open' | 'closing' | 'closed';
  /** When the current session's allocation webhook first got its 2xx; null until then. */
  acceptedAt: number | null;
  /** The agent Qiscus took the room off when it was resolved (while state is 'closing'). */
  closingFrom: number | null;
  /** The webhook's `source` and `channel.id` (null: no channel), which its route is chosen by. */
  source: string;
  channel: number | null;
}

const MEMBERSHIP_EXCUSE = 'division membership not pulled yet (Qiscus and the database disagree)';
/** Conditions that do not keep the run from having settled: a room inside its own backoff (3a), and a membership
 * change Qiscus made that the next scheduled pull will bring (6: up to AGENT_SYNC_SECONDS, 30 s, after a change
 * made as late as 15 s before the traffic stops; judged apart, within MEMBERSHIP_PICKUP_MS). */
const SETTLED_DESPITE = new Set(["room's own backoff after a failed call", MEMBERSHIP_EXCUSE]);

export interface Violation {
  room: string;
  /** The first agent found free for it past the bound; `agents` lists every one. */
  agent: number;
  agents: number[];
  /** Age of the condition (excused time not counted) when it crossed the bound, ms. */
  ageMs: number;
  firstSeen: number;
  detectedAt: number;
  counts: string;
  /** The room's calls of this session, as the tap saw them. */
  calls: string;
  /** The database's view of the room and the agent, read when the violation was found. */
  db: string;
  /** What the database's view says held the room back (see `causeOf`). */
  cause: string;
  /** What the driver was doing then (processes serving, recent restarts), from `context`. */
  context: string;
}

export interface LivenessFigures {
  samples: number;
  conditions: number;
  servedWithinBound: number;
  /** Distinct conditions excused at least once, by excuse. */
  excused: Record<string, number>;
  violations: Violation[];
  /** Largest age (excused time not counted) any condition reached, ms. */
  maxAgeMs: number;
  maxSampleGapMs: number;
  stalls: number;
  /** Samples during which the watch's probe of the database was slower than SLOW_DB_MS. */
  slowDatabase: number;
  maxProbeMs: number;
  /** Rooms found waiting with a free agent whose session the database had ended as failed (gave up): not served. */
  gaveUp: string[];
}

interface ModelAgent {
  load: number;
  inflight: number;
  held: number;
  unreported: number;
  free: number;
  rooms: Set<string>;
  /** Qiscus's divisions of the agent. */
  divisions: number[];
}

interface Cond {
  since: number;
  firstSeen: number;
  excusedBy: Set<string>;
  reported: boolean;
}

interface Window {
  from: number;
  to: number;
  rooms?: Set<string>;
  agents?: Set<number>;
  why: string;
}

export interface Settings {
  capacity: number;
  retryBaseSeconds: number;
  retryMaxSeconds: number;
  outageFailures: number;
  leaseSeconds: number;
}

export class LivenessWatch {
  private readonly conds = new Map<string, Cond>();
  private readonly windows: Window[] = [];
  private readonly callsByRoom = new Map<string, TapCall[]>();
  private readonly openCalls = new Map<string, number>();
  private readonly openByAgent = new Map<number, TapCall[]>();
  private readonly callsByAgent = new Map<number, TapCall[]>();
  /** Per room session (`room#session`): the excuses that held its clock at some point. */
  readonly roomExcuses = new Map<string, Set<string>>();
  private readonly undecidedByRoom = new Map<string, number>();
  /** Calls that ended without an answer reaching the listener, newest last (see lateLandings). */
  private readonly unanswered: TapCall[] = [];
  /** Calls in flight when PostgreSQL was stopped (see onEnd). */
  private readonly reportMayBeLost = new Set<TapCall>();
  private decidedIndex = 0;
  /** Finished calls as the allocator's outage rule sees them, newest last. */
  private readonly finished: Array<{ room: string; session: number; transient: boolean }> = [];
  private qiscusDown = false;
  /** Per agent: rooms of ours Qiscus counted on it at the latest pull that were not confirmed yet (excuse 4). */
  private readonly pullAmbiguity = new Map<number, Set<string>>();
  /** Agents whose latest pull said its count includes rooms of ours it could not place (external_load > external_seen). */
  private declaredAmbiguous = new Set<number>();
  /** Date.now() of the latest roster pull's request. */
  private lastPullAt = -Infinity;
  /** Calls whose listener was killed under them (rescued, not reported: no backoff of the room's own). */
  private readonly cutByKill = new WeakSet<TapCall>();
  private pgDownSince: number | null = null;
  private lastKill = -Infinity;
  private killWindow: Window | undefined;
  /** Rooms and agents of the calls in flight at a PostgreSQL stop or ended while it was down. */
  private pgCalls: { rooms: Set<string>; agents: Set<number> } | undefined;
  private attempts = new Map<string, number>();
  /** Each agent's divisions as the database had them at the latest probe (null: not read yet). */
  private dbDivisions: Map<number, number[]> | null = null;
  private lastSample = 0;
  private settleFrom: number | null = null;
  private settledAt: number | null = null;
  private stopped = false;
  private timer: NodeJS.Timeout | undefined;
  private dbBusy = false;
  private probeStart = 0;
  /** A probe finished slow since the last sample. */
  private probeWasSlow = false;
  /** The watch's own connection for its probe (the driver's pool may be busy with its own queries). */
  private readonly probe: pg.Pool;
  /** The violation of each room session (one per waiting episode; further free agents are added to it). */
  private readonly byRoom = new Map<string, Violation>();
  readonly figures: LivenessFigures = {
    samples: 0,
    conditions: 0,
    servedWithinBound: 0,
    excused: {},
    violations: [],
    maxAgeMs: 0,
    maxSampleGapMs: 0,
    stalls: 0,
    slowDatabase: 0,
    maxProbeMs: 0,
    gaveUp: [],
  };

  constructor(
    private readonly o: {
      sim: Simulator;
      tap: QiscusTap;
      rooms: () => Iterable<RoomView>;
      room: (id: string) => RoomView | undefined;
      settings: Settings;
      pool: pg.Pool;
      pgUp: () => boolean;
      databaseUrl: string;
      /** Listener processes serving now (started and not killed since). */
      listenersServing: () => number;
      /** The driver's state, for the report of a violation. */
      context?: () => string;
      /** The routes as last committed (none: every room may go to any agent). */
      routes?: () => readonly RouteRow[];
    },
  ) {
    this.probe = new pg.Pool({ connectionString: o.databaseUrl, max: 1, connectionTimeoutMillis: 5000 });
    this.probe.on('error', () => {}); // PostgreSQL restarts under it
    o.tap.onCall = (c) => {
      c.session = o.room(c.room)?.sessions ?? 0;
      const list = this.callsByRoom.get(c.room) ?? [];
      list.push(c);
      this.callsByRoom.set(c.room, list);
      this.openCalls.set(c.room, (this.openCalls.get(c.room) ?? 0) + 1);
      const byAgent = this.openByAgent.get(c.agent) ?? [];
      byAgent.push(c);
      this.openByAgent.set(c.agent, byAgent);
      const all = this.callsByAgent.get(c.agent) ?? [];
      all.push(c);
      this.callsByAgent.set(c.agent, all);
      this.undecidedByRoom.set(c.room, (this.undecidedByRoom.get(c.room) ?? 0) + 1);
    };
    o.tap.onPull = (at) => {
      this.lastPullAt = at;
      // What Qiscus counts now, agent by agent, and which of those rooms the database could not place yet.
      for (const a of o.sim.agents()) {
        const unsettled = new Set<string>();
        for (const room of a.rooms) {
          const r = o.room(room);
          const confirmed = (this.callsByRoom.get(room) ?? []).some(
            (c) =>
              c.agent === a.id &&
              c.session === r?.sessions &&
              c.status !== undefined &&
              c.status >= 200 &&
              c.status < 300 &&
              c.end! <= at - PULL_SLACK_MS,
          );
          if (!confirmed) unsettled.add(room);
        }
        if (unsettled.size) this.pullAmbiguity.set(a.id, unsettled);
        else this.pullAmbiguity.delete(a.id);
      }
    };
    o.tap.onEnd = (c) => {
      this.openCalls.set(c.room, (this.openCalls.get(c.room) ?? 1) - 1);
      const byAgent = this.openByAgent.get(c.agent);
      if (byAgent) byAgent.splice(byAgent.indexOf(c), 1);
      if (c.upstreamError) this.undecidedByRoom.set(c.room, (this.undecidedByRoom.get(c.room) ?? 1) - 1);
      // No answer reached the listener (its timeout, or it died): Qiscus may still apply the call. Nor, as the
      // allocator sees it, to a listener whose presence a PostgreSQL restart took mid-call: its reservation is
      // rescued as a dead listener's (unanswered), whatever the answer was.
      const reportLost = this.reportMayBeLost.delete(c);
      const noAnswer = (c.clientGone && !c.upstreamError) || NO_ANSWER_STATUSES.includes(c.status ?? 0);
      if (noAnswer || reportLost) this.unanswered.push(c);
      // Cut by a kill: the listener went away within half a second of a kill (else it was its own timeout).
      const cutByKill = Boolean(c.clientGone) && c.end! >= this.lastKill && c.end! - this.lastKill < 500;
      if (cutByKill) this.cutByKill.add(c);
      if (cutByKill && this.killWindow) {
        this.killWindow.rooms!.add(c.room);
        this.killWindow.agents!.add(c.agent);
      }
      if (this.pgCalls) {
        this.pgCalls.rooms.add(c.room);
        this.pgCalls.agents.add(c.agent);
      }
      // The allocator's outage rule (db/code/09-qiscus-health.sql) over the calls as they finish: an answer
      // (assignment or refusal) ends an outage; a transient failure after outage_failures − 1 others, over two
      // rooms or more, starts one. Calls cut by a kill are rescued, not reported: they do not count.
      if (cutByKill) return;
      const answered = c.status !== undefined && c.status >= 200 && c.status < 500 && c.status !== 429;
      if (answered) {
        this.qiscusDown = false;
        this.finished.push({ room: c.room, session: c.session ?? 0, transient: false });
      } else {
        this.finished.push({ room: c.room, session: c.session ?? 0, transient: true });
        const n = this.o.settings.outageFailures;
        const last = this.finished.slice(-n);
        if (
          !this.qiscusDown &&
          last.length === n &&
          last.every((x) => x.transient) &&
          new Set(last.map((x) => `${x.room}#${x.session}`)).size >= 2
        ) {
          this.qiscusDown = true;
        }
      }
      if (this.finished.length > 100) this.finished.splice(0, 50);
    };
  }

  // ---------------------------------------------------------------------------------------------------------------
  // What the driver tells the watch
  // ---------------------------------------------------------------------------------------------------------------

  start(): void {
    this.lastSample = Date.now();
    this.timer = setInterval(() => this.sample(), SAMPLE_MS);
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    void this.probe.end().catch(() => {});
  }

  pgStopping(at = Date.now()): void {
    this.pgDownSince = at;
    this.pgCalls = { rooms: new Set(), agents: new Set() };
    // calls in flight now end during the outage: their listeners lose their presence with the connection
    for (const calls of this.openByAgent.values()) {
      for (const c of calls) {
        this.pgCalls.rooms.add(c.room);
        this.pgCalls.agents.add(c.agent);
        this.reportMayBeLost.add(c);
      }
    }
  }

  pgStarted(at = Date.now()): void {
    this.pgDownSince = null;
    if (!this.pgCalls) return;
    // the reservations of the listeners' lost presences: as a dead listener's (excuse 1, then 2)
    this.windows.push({
      from: at,
      to: at + DEAD_LISTENER_MS,
      rooms: this.pgCalls.rooms,
      agents: this.pgCalls.agents,
      why: 'PostgreSQL restart: reservations of lost presences',
    });
    this.pgCalls = undefined;
  }

  /**
   * A listener is being killed now (call it right before the signal): its calls cut from now on are excused.
   * Returns a function that adds its reservations as the database shows them, once read.
   */
  listenerKilled(at = Date.now()): (reserved: Array<{ room: string; agent: number }>) => void {
    this.lastKill = at;
    const w: Window = { from: at, to: at + DEAD_LISTENER_MS, rooms: new Set(), agents: new Set(), why: 'listener killed: its reservations' };
    this.killWindow = w;
    this.windows.push(w);
    return (reserved) => {
      for (const r of reserved) {
        w.rooms!.add(r.room);
        w.agents!.add(r.agent);
      }
    };
  }

  /** The traffic and the faults have stopped: the settle time is measured from now. */
  trafficStopped(at = Date.now()): void {
    this.settleFrom = at;
  }

  get settleMs(): number | null {
    return this.settleFrom !== null && this.settledAt !== null ? this.settledAt - this.settleFrom : null;
  }

  /** Assign calls for the room that reached the tap and that Qiscus has not decided yet (they may still land). */
  undecided(room: string): number {
    this.catchUpDecided();
    return this.undecidedByRoom.get(room) ?? 0;
  }

  /**
   * For the webhook→assign figure: the free slots of the agents who may serve room `id` now (Qiscus and the
   * database agreeing), and the other waiting rooms any of them may serve. Computed afresh: a room accepted a
   * moment ago is one of those waiting rooms.
   */
  freeSlotsAndWaiting(id: string): { free: number; waiting: number } {
    const now = Date.now();
    const m = this.model(now);
    const room = this.o.room(id);
    const servers = [...m.agents].filter(([a]) => !room || this.mayServe(room, a, m.agents.get(a)!, now) === 'yes');
    let free = 0;
    for (const [, a] of servers) free += Math.max(0, a.free);
    const waiting = m.waiting.filter((r) => r.id !== id && servers.some(([a, x]) => this.mayServe(r, a, x, now) !== 'no'));
    return { free, waiting: waiting.length };
  }

  /**
   * May agent `id` serve room `r` now (see the header)? 'membership' when Qiscus and the database disagree on
   * whether it is in one of the room's route's divisions (excuse 6).
   */
  private mayServe(r: RoomView, id: number, a: ModelAgent, now: number): 'yes' | 'no' | 'membership' {
    const { route, overflowed } = this.routeOf(r, now);
    if (!route || overflowed) return 'yes';
    const inQiscus = intersects(route.division_ids, a.divisions);
    const inDb = intersects(route.division_ids, this.dbDivisions?.get(id) ?? []);
    return inQiscus && inDb ? 'yes' : inQiscus || inDb ? 'membership' : 'no';
  }

  // ---------------------------------------------------------------------------------------------------------------
  // The model
  // ---------------------------------------------------------------------------------------------------------------

  private catchUpDecided(): void {
    const log = this.o.sim.assignments;
    for (; this.decidedIndex < log.length; this.decidedIndex++) {
      const e = log[this.decidedIndex]!;
      this.undecidedByRoom.set(e.room_id, (this.undecidedByRoom.get(e.room_id) ?? 1) - 1);
    }
  }

  /** The room's calls of its current session. */
  private sessionCalls(r: RoomView): TapCall[] {
    return (this.callsByRoom.get(r.id) ?? []).filter((c) => c.session === r.sessions);
  }

  /**
   * The agent whose slot the room holds after its calls of this session (db/code/05-outcomes.sql, requeue): an
   * ambiguous failure (5xx, timeout, the listener gone) holds the called agent; a 429 changes nothing; an
   * assignment or a refusal lets go. Also the agents that refused the room.
   */
  private roomState(r: RoomView): { hold: number | null; refused: Set<number>; last: TapCall | undefined } {
    let hold: number | null = null;
    const refused = new Set<number>();
    let last: TapCall | undefined;
    for (const c of this.sessionCalls(r)) {
      if (c.end === undefined) continue;
      if (!last || c.end >= last.end!) last = c;
    }
    const ended = this.sessionCalls(r).filter((c) => c.end !== undefined).sort((x, y) => x.end! - y.end!);
    for (const c of ended) {
      const s = c.status ?? 0;
      if (s >= 200 && s < 300) hold = null;
      else if (s === 429) continue;
      else if (s >= 400 && s < 500) {
        refused.add(c.agent);
        if (hold === c.agent) hold = null;
      } else hold = c.agent; // 5xx, or no answer (timeout, killed, unreachable)
    }
    return { hold, refused, last };
  }

  private model(now: number) {
    const agents = new Map<number, ModelAgent>();
    const simAgents = this.o.sim.agents();
    for (const a of simAgents) {
      if (a.type_as_string !== 'agent' || !a.is_available || a.force_offline) continue;
      const rooms = new Set(a.rooms);
      const inflight = (this.openByAgent.get(a.id) ?? []).filter((c) => !rooms.has(c.room)).length;
      agents.set(a.id, { load: rooms.size, inflight, held: 0, unreported: 0, free: 0, rooms, divisions: a.divisions });
    }
    const waiting: Array<RoomView & { st: ReturnType<LivenessWatch['roomState']> }> = [];
    for (const r of this.o.rooms()) {
      if (r.state === 'closing') {
        const a = r.closingFrom === null ? undefined : agents.get(r.closingFrom);
        if (a) a.unreported++;
        continue;
      }
      if (r.state !== 'open' || this.o.sim.agentOf(r.id) !== null) continue;
      const st = this.roomState(r);
      if ((this.openCalls.get(r.id) ?? 0) > 0) continue; // a call is on its way: the assignment has started
      if (st.hold !== null) {
        const a = agents.get(st.hold);
        if (a) a.held++;
      }
      if (r.acceptedAt !== null) waiting.push({ ...r, st });
    }
    for (const agent of this.lateLandings()) {
      const a = agents.get(agent);
      if (a) a.held++;
    }
    for (const a of agents.values()) a.free = this.o.settings.capacity - a.load - a.inflight - a.held - a.unreported;
    void now;
    return { agents, waiting };
  }

  /**
   * The agents of calls that got no answer (timeout, listener killed) that Qiscus does not show on their agent:
   * Qiscus may still apply such a call, until its lease ends. Whenever the allocator lets go of the agent's slot for
   * that room meanwhile (the room resolved, cancelled, given up, refused by that agent on a retry), it keeps the count
   * until the first roster pull that starts after that lease (let_go_slot, may_land_until): invariant 9's "first
   * pull that started after the call ended", with the lease as the call's end. (A room still waiting to retry with
   * that agent is counted as held already: not again. A room assigned by its retry and then resolved is counted
   * too, though the allocator frees that slot at once: the watch is the more lenient there, never the stricter.)
   */
  private lateLandings(): number[] {
    const leaseMs = this.o.settings.leaseSeconds * 1000;
    const pulls = this.o.tap.pulls;
    const latestPull = pulls.length ? pulls[pulls.length - 1]! : -Infinity;
    const settled = (c: TapCall) => latestPull >= c.start + leaseMs + PULL_SLACK_MS; // a pull after its lease
    while (this.unanswered.length && settled(this.unanswered[0]!)) this.unanswered.shift();
    const agents: number[] = [];
    for (const c of this.unanswered) {
      if (settled(c)) continue; // (ended in another order than they started)
      if (this.o.sim.agentOf(c.room) === c.agent) continue; // landed: Qiscus's count has it
      const r = this.o.room(c.room);
      if (r && r.state === 'open' && this.roomState(r).hold === c.agent) continue; // held for its retry already
      agents.push(c.agent);
    }
    return agents;
  }

  /** A call of ours to the agent was out during the PULL_WINDOW_MS before the latest pull's request (or is still). */
  private callNearLastPull(agent: number): boolean {
    const at = this.lastPullAt;
    const calls = this.callsByAgent.get(agent) ?? [];
    for (let i = calls.length - 1; i >= 0; i--) {
      const c = calls[i]!;
      if (c.start < at && (c.end === undefined || c.end > at - PULL_WINDOW_MS)) return true;
      if (c.start < at - 60_000) break; // calls are in order of start; none this old is still out
    }
    return false;
  }

  /** Calls in flight (the listener still waiting for them) fill every serving listener's pipeline. */
  private pipelinesFull(): boolean {
    let open = 0;
    for (const calls of this.openByAgent.values()) open += calls.length;
    return open >= LISTENER_CONCURRENCY * Math.max(1, this.o.listenersServing());
  }

  private backoffBoundMs(room: string, sessionCalls: number): number {
    const s = this.o.settings;
    const k = Math.max(this.attempts.get(room) ?? sessionCalls + 1, 1);
    const backoff = Math.min(s.retryMaxSeconds, s.retryBaseSeconds * 2 ** (k - 1));
    return Math.max(backoff, 1) * 1000; // a 429's Retry-After here is 1 s
  }

  private excuses(now: number, room: RoomView & { st: ReturnType<LivenessWatch['roomState']> }, agent: number): string[] {
    const why: string[] = [];
    if (this.pgDownSince !== null) why.push('PostgreSQL down');
    for (const w of this.windows) {
      if (now < w.from || now > w.to) continue;
      if (!w.rooms || w.rooms.has(room.id) || w.agents!.has(agent)) why.push(w.why);
    }
    if (this.qiscusDown) why.push('Qiscus down for everyone (outage rule)');
    if (this.pullAmbiguity.has(agent) || (this.declaredAmbiguous.has(agent) && this.callNearLastPull(agent))) {
      why.push('roster pull ambiguity: a room of ours on the agent not placed yet');
    }
    if (this.pipelinesFull()) why.push("Qiscus slow: calls in flight fill every listener's pipeline");
    const last = room.st.last;
    if (last && !(last.status !== undefined && last.status >= 200 && last.status < 500 && last.status !== 429)) {
      if (!this.cutByKill.has(last) && now < last.end! + this.backoffBoundMs(room.id, this.sessionCalls(room).length)) {
        why.push("room's own backoff after a failed call");
      }
    }
    return why;
  }

  /** The room's route under the routes as last committed, and whether its overflow time has passed. */
  private routeOf(r: RoomView, now: number): { route: RouteRow | undefined; overflowed: boolean } {
    const route = routeFor(this.o.routes?.() ?? [], r.source, r.channel);
    const o = route?.overflow_seconds ?? null;
    return { route, overflowed: o !== null && r.acceptedAt !== null && now >= r.acceptedAt + o * 1000 };
  }

  // ---------------------------------------------------------------------------------------------------------------
  // Sampling
  // ---------------------------------------------------------------------------------------------------------------

  sample(now = Date.now()): void {
    if (this.stopped) return;
    this.catchUpDecided();
    const gap = now - this.lastSample;
    this.lastSample = now;
    this.figures.samples++;
    this.figures.maxSampleGapMs = Math.max(this.figures.maxSampleGapMs, gap);
    const stalled = gap > STALL_MS;
    if (stalled) this.figures.stalls++;
    const dbSlow = (this.dbBusy && now - this.probeStart > SLOW_DB_MS) || this.probeWasSlow;
    this.probeWasSlow = false;
    if (dbSlow) this.figures.slowDatabase++;
    for (let i = this.windows.length - 1; i >= 0; i--) if (this.windows[i]!.to < now - 60_000) this.windows.splice(i, 1);

    const m = this.model(now);
    const seen = new Set<string>();
    let unsettled = 0;
    for (const r of m.waiting) {
      for (const [id, a] of m.agents) {
        if (a.free <= 0 || r.st.refused.has(id)) continue;
        const may = this.mayServe(r, id, a, now);
        if (may === 'no') continue;
        const key = `${r.id}#${r.sessions}|${id}`;
        seen.add(key);
        let c = this.conds.get(key);
        if (!c) {
          c = { since: now, firstSeen: now, excusedBy: new Set(), reported: false };
          this.conds.set(key, c);
          this.figures.conditions++;
        }
        const why = this.excuses(now, r, id);
        if (may === 'membership') why.push(MEMBERSHIP_EXCUSE);
        if (stalled) why.push('the chaos driver (simulator, tap) stalled');
        if (dbSlow && this.pgDownSince === null) why.push('the database (or the machine) did not answer within 0.5 s');
        if (!why.every((w) => SETTLED_DESPITE.has(w)) || why.length === 0) unsettled++;
        if (why.length > 0) {
          const mine = this.roomExcuses.get(`${r.id}#${r.sessions}`) ?? new Set<string>();
          this.roomExcuses.set(`${r.id}#${r.sessions}`, mine);
          for (const w of why) {
            mine.add(w);
            if (!c.excusedBy.has(w)) {
              c.excusedBy.add(w);
              this.figures.excused[w] = (this.figures.excused[w] ?? 0) + 1;
            }
          }
          c.since = now;
          continue;
        }
        const age = now - c.since;
        this.figures.maxAgeMs = Math.max(this.figures.maxAgeMs, age);
        if (age > BOUND_MS && !c.reported) {
          c.reported = true;
          const v = this.byRoom.get(`${r.id}#${r.sessions}`);
          if (v && v.detectedAt >= now - 60_000) v.agents.push(id);
          else this.violation(r, id, a, c, now);
        }
      }
    }
    for (const [key, c] of this.conds) {
      if (seen.has(key)) continue;
      if (!c.reported) this.figures.servedWithinBound++;
      this.conds.delete(key);
    }
    if (this.settleFrom !== null && this.settledAt === null && now >= this.settleFrom && unsettled === 0) {
      this.settledAt = now;
    }
    void this.readAttempts();
  }

  /** The database's attempt counts of the open sessions (for the backoff bound). */
  private async readAttempts(): Promise<void> {
    if (this.dbBusy || !this.o.pgUp()) return;
    this.dbBusy = true;
    this.probeStart = Date.now();
    try {
      const r = await this.probe.query<{ room_id: string | null; attempts: number | null; agent: string | null; ambiguous: boolean; divisions: number[] | null }>(
        `select room_id, attempts, null::text as agent, false as ambiguous, null::int[] as divisions
         from allocator.sessions where state in ('waiting', 'reserved')
         union all
         select null, null, id::text, external_load > external_seen, division_ids::int[] from allocator.agents`,
      );
      this.attempts = new Map(r.rows.filter((x) => x.room_id !== null).map((x) => [x.room_id!, x.attempts!]));
      this.declaredAmbiguous = new Set(r.rows.filter((x) => x.ambiguous).map((x) => Number(x.agent)));
      this.dbDivisions = new Map(r.rows.filter((x) => x.agent !== null).map((x) => [Number(x.agent), x.divisions ?? []]));
    } catch {
      // PostgreSQL restarting: keep the last counts
    } finally {
      this.dbBusy = false;
      const took = Date.now() - this.probeStart;
      this.figures.maxProbeMs = Math.max(this.figures.maxProbeMs, took);
      if (took > SLOW_DB_MS) this.probeWasSlow = true;
    }
  }

  private violation(
    r: RoomView & { st: ReturnType<LivenessWatch['roomState']> },
    agent: number,
    a: ModelAgent,
    c: Cond,
    now: number,
  ): void {
    const fmt = (t: number) => new Date(t).toISOString().slice(11, 23);
    const calls = this.sessionCalls(r)
      .slice(-4)
      .map((x) => `${fmt(x.start)} → agent ${x.agent}: ${x.end === undefined ? 'in flight' : x.clientGone ? `cut after ${x.end - x.start} ms` : `${x.status} after ${x.end - x.start} ms`}`)
      .join('; ');
    const { route, overflowed } = this.routeOf(r, now);
    const v: Violation = {
      room: r.id,
      agent,
      agents: [agent],
      ageMs: now - c.since,
      firstSeen: c.firstSeen,
      detectedAt: now,
      counts:
        `capacity ${this.o.settings.capacity}, Qiscus shows ${a.load} rooms, ${a.inflight} calls in flight, ${a.held} held for a failed call, ${a.unreported} resolutions not yet delivered: ${a.free} free; ` +
        `room ${r.source}/${String(r.channel)}, route ${route ? `{${route.division_ids.join(',')}} overflow ${String(route.overflow_seconds)} s${overflowed ? ' (overflowed)' : ''}` : 'none'}; ` +
        `agent in {${a.divisions.join(',')}} (database {${(this.dbDivisions?.get(agent) ?? []).join(',')}})`,
      calls: calls || 'no call this session',
      db: '(not read)',
      cause: 'unknown (database not read)',
      context: this.o.context?.() ?? '',
    };
    this.figures.violations.push(v);
    this.byRoom.set(`${r.id}#${r.sessions}`, v);
    void (async () => {
      try {
        const s = await this.o.pool.query(
          `select id, state::text, agent_id, holds_slot, uncertain, attempts, last_agent_id, excluded_agents,
                  round(extract(epoch from (next_attempt_at - now()))::numeric, 2) as due_in_s,
                  round(extract(epoch from (now() - reserved_at))::numeric, 2) as reserved_ago_s, last_error
           from allocator.sessions where room_id = $1 order by id desc limit 1`,
          [r.id],
        );
        const ag = await this.o.pool.query(
          `select our_load, external_load, external_seen, qiscus_load, accepting, total_load,
                  round(extract(epoch from (now() - external_hold_until))::numeric, 2) as hold_until_ago_s,
                  round(extract(epoch from (now() - synced_at))::numeric, 2) as synced_ago_s,
                  (select json_agg(json_build_object('room', q.room_id, 'state', q.state, 'holds_slot', q.holds_slot,
                                                     'reserved_ago_s', round(extract(epoch from (now() - q.reserved_at))::numeric, 2)))
                   from allocator.sessions q
                   where q.agent_id = a.id and (q.state in ('reserved', 'assigned') or q.holds_slot)) as open_sessions
           from allocator.agents a where a.id = $1`,
          [agent],
        );
        const h = await this.o.pool.query(`select down_since is not null as down from allocator.qiscus_health`);
        const failed = s.rows[0]?.state === 'failed' || s.rows[0]?.state === 'cancelled';
        if (failed) this.figures.gaveUp.push(r.id);
        v.cause = causeOf(s.rows[0], ag.rows[0], this.o.settings.capacity, Boolean(h.rows[0]?.down));
        const lag = Date.now() - now;
        v.db =
          (lag > 500 ? `(read ${(lag / 1000).toFixed(1)} s after the violation: the room may have moved on) ` : '') +
          `session ${JSON.stringify(s.rows[0] ?? null)}; agent ${JSON.stringify(ag.rows[0] ?? null)}; qiscus down: ${String(h.rows[0]?.down)}`;
      } catch (e) {
        v.db = `(database unreachable: ${e instanceof Error ? e.message : String(e)})`;
      }
    })();
  }

  /** Violations that are not rooms the database gave up on (those are counted apart). */
  realViolations(): Violation[] {
    return this.figures.violations.filter((v) => !this.figures.gaveUp.includes(v.room));
  }
}

/**
 * What held a room back, from the database's rows read at the violation (sessions, agents): a label to group the
 * violations of a run by, not an excuse. The first that applies.
 */
export function causeOf(
  s: Record<string, unknown> | undefined,
  a: Record<string, unknown> | undefined,
  capacity: number,
  qiscusDown: boolean,
): string {
  if (!s) return 'no session in the database';
  const state = String(s.state);
  if (state === 'failed' || state === 'cancelled') return `session ${state} (gave up)`;
  if (state === 'reserved') return 'reserved in the database, but no call reached Qiscus';
  if (state !== 'waiting') return `session ${state} in the database while Qiscus shows it waiting`;
  if (Number(s.due_in_s) > 0) return s.holds_slot ? 'waiting, holding a slot, backing off' : 'waiting, backing off';
  if (qiscusDown) return 'the allocator thinks Qiscus is down';
  if (!a) return 'agent unknown to the database';
  if (!a.accepting) return 'agent not accepting in the database (offline or paused)';
  if (Number(a.total_load) >= capacity) {
    if (Number(a.external_load) > 0) {
      return 'agent full in the database by external_load (a roster pull counted a room of ours as by hand)';
    }
    const open = (a.open_sessions ?? []) as Array<{ state: string; reserved_ago_s: number }>;
    if (open.some((x) => x.state === 'reserved')) {
      return 'agent full in the database by our_load: a reservation of ours whose call had not reached Qiscus';
    }
    return 'agent full in the database by our_load';
  }
  return 'due, agent free in the database: nobody reserved it (a wake-up missed?)';
}

/** p-th percentile (0-100) of xs, nearest rank; NaN when empty. */
export function percentile(xs: number[], p: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))]!;
}
