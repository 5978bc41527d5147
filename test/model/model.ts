/**
 * A small reference model of the allocation core (db/committed/000001-allocation-core.sql), in plain TypeScript.
 *
 * It states the SQL's rules as simply as possible, so that a model-based test (commands.ts, model.test.ts) can run
 * the same random sequence of webhooks, reservations and outcomes against PostgreSQL and against this model and
 * check, after every step, that both agree on who waits, in what order, and who holds what.
 *
 * Time: no wall clock. `now` is a logical clock that the harness advances by one per command (each command is
 * its own transaction in PostgreSQL, so its own `now()`). A backoff is "far in the future" (Infinity): the tests
 * set retry_base_seconds so high that no backoff ends during a run, and an explicit "time passes" command makes
 * every pending backoff due. Overflows of routes count in hours: `hour` goes up by one when the harness moves every
 * room's queued_at (and overflow_at) an hour back; a run itself lasts far less than an hour.
 *
 * Routing (db/code/11-routing.sql): agents' divisions, routes, and on each room the answer of its route
 * (divisionIds, overflowAt, kept on the room like the SQL's columns); mayServe() is the SQL's may_serve().
 *
 * `rules` chooses, for each known disagreement between the SQL and the product spec, which of the two the model follows
 * (see Rules below). Everything else is the SQL's behaviour, deliberately.
 */

export type State = 'waiting' | 'reserved' | 'assigned' | 'resolved' | 'failed';
export type Outcome = 'waiting' | 'failed';

export interface Agent {
  id: number;
  type: string; // Qiscus type_as_string; only 'agent' serves rooms
  isAvailable: boolean;
  forceOffline: boolean;
  present: boolean; // false once the agent vanished from a complete roster
  paused: boolean;
  maxLoad: number | null; // null: settings.default_max_load
  load: number; // our rooms: reserved + assigned + waiting rooms holding a slot
  externalLoad: number; // rooms assigned by hand (from the last syncs: up at once, down when two agree)
  externalSeen: number; // the lowest by-hand count the last sync could be sure of
  /** external_held: counts handed to Qiscus for calls that may still land, held past every pull of a run (their
   * leases are an hour here) */
  heldCount: number;
  pulledOurs: number; // our rooms the last sync subtracted
  qiscusLoad: number | null;
  lastAssignedAt: number | null; // logical time of the last slot taken
  divisions: number[]; // agents.division_ids: sorted, as the last sync_divisions left them
}

/** A row of allocator.routes; `overflowHours` is overflow_seconds / 3600 (null: never). */
export interface Route {
  id: number;
  source: string | null;
  channel: number | null;
  divisions: number[];
  overflowHours: number | null;
  position: number;
}

export interface Session {
  id: number;
  room: string;
  state: State;
  priorServiceId: number | null;
  serviceId: number | null;
  agentId: number | null; // kept after the reservation ends, as history
  attemptId: number | null; // current reservation, while reserved
  attempts: number;
  excluded: number[]; // agents that refused the room, in refusal order
  holdsSlot: boolean;
  uncertain: boolean; // a call for agentId may have reached Qiscus: held through later failures
  lastAgentId: number | null; // agent of the last failed (non-refused) try: preferred for the retry
  nextAt: number; // logical time from which it may be reserved; Infinity while backing off
  gaveUp: 'attempts' | 'refused' | null; // why it failed: out of attempts, or refused by every agent
  lateServiceId: number | null; // the service a call that landed after the resolution opened (settleResolvedInFlight)
  lateLandingAt: number | null; // when such a call (service named or not) was counted or handed to a newer session
  source: string;
  channel: number | null;
  queuedHour: number;
  divisionIds: number[] | null; // its route's divisions (null: any agent); set until assigned, then kept
  overflowAt: number | null; // hour from which any agent may serve it (null: never)
}

export interface Attempt {
  id: number;
  sessionId: number;
  agentId: number;
  number: number;
  outcome: string | null;
  /** The call got no answer (attempts.unanswered): Qiscus may still apply it until its lease would have ended. */
  unanswered?: boolean;
}

export interface Reservation {
  attemptId: number;
  sessionId: number;
  room: string;
  agentId: number;
  attempt: number;
}

/** What a webhook did; `sessionId` undefined: any (where the spec says nothing about which session is named). */
export interface WebhookResult {
  outcome: string;
  sessionId: number | null | undefined;
}

export interface RosterEntry {
  id: number;
  type: string;
  isAvailable: boolean;
  forceOffline: boolean;
  count: number; // current_customer_count as Qiscus reports it
}

/**
 * Where the SQL and the intended rule disagree(d), which one the model follows. 'sql' mirrors the SQL as it was
 * (so that the property test can guard everything else); 'spec' is the intended rule, stated below with each key
 * (the first two: README, Decisions, "Repeats and returning customers"); the regression tests of the bugs use it.
 * Every rule is fixed in the SQL now, so both sets are 'spec'.
 */
export interface Rules {
  /**
   * A late copy of an allocation webhook whose session is resolved, when the room had a newer session since.
   * sql: only the room's LAST session is compared (prior_service_id), so the copy opens a new session.
   * spec: a copy of any webhook that opened a now-resolved session changes nothing.
   */
  lateNewRequestCopy: 'sql' | 'spec';
  /**
   * A repeated Mark-as-Resolved webhook (same service id) arriving after the customer came back.
   * sql: it closes whatever session is open in the room, i.e. the returning customer's new one.
   * spec: a resolution naming a service that already resolved a session of the room changes nothing.
   */
  repeatedResolution: 'sql' | 'spec';
  /**
   * A room whose reservation ends without a refusal (transient failure, expired lease, release) when no agent
   * outside its excluded list is present any more (e.g. its only agent vanished from the roster).
   * sql: failed, "refused by every agent", although no agent refused it.
   * spec: it waits like any other room (giving up for refusals needs at least one refusal).
   */
  giveUpWithoutRefusal: 'sql' | 'spec';
}

/** The SQL as it is today. When the SQL is fixed, switch the fixed rule to 'spec' here (or drop the rule). */
export const SQL_RULES: Rules = { lateNewRequestCopy: 'spec', repeatedResolution: 'spec', giveUpWithoutRefusal: 'spec' };
/** Every rule as intended: the 'spec' side of each key of Rules. */
export const SPEC_RULES: Rules = { lateNewRequestCopy: 'spec', repeatedResolution: 'spec', giveUpWithoutRefusal: 'spec' };

const OPEN: ReadonlySet<State> = new Set(['waiting', 'reserved', 'assigned']);

export class Model {
  now = 0;
  defaultMaxLoad = 2;
  maxAttempts = 8;
  readonly agents = new Map<number, Agent>();
  readonly sessions: Session[] = []; // by id (id = index + 1)
  /** "room:service" of every resolution webhook stored (settleResolvedInFlight asks whether a new service's came). */
  private readonly resolutionsStored = new Set<string>();
  /** Logical time of the last complete roster pull (allocator.roster_pulls.started_at). */
  private lastPullAt = -Infinity;
  readonly attempts: Attempt[] = []; // by id (id = index + 1)
  hour = 0;
  routes: Route[] = []; // by id
  private routeIds = 0;

  constructor(readonly rules: Rules = SQL_RULES) {}

  /** Each command is its own transaction: a new `now()`. */
  tick(): void {
    this.now += 1;
  }

  // ---------------------------------------------------------------------------------------------------------------
  // Reading

  capacity(a: Agent): number {
    return a.maxLoad ?? this.defaultMaxLoad;
  }

  /** type agent, present, available, not forced offline: what a held room's agent must be to get it back. */
  online(a: Agent | undefined): a is Agent {
    return !!a && a.type === 'agent' && a.present && a.isAvailable && !a.forceOffline;
  }

  /** The view eligible_agents: online, not paused, below capacity (counting rooms assigned by hand). */
  eligible(a: Agent | undefined): a is Agent {
    return this.online(a) && !a.paused && a.load + a.externalLoad < this.capacity(a);
  }

  /** agent_preference(): eligible agents, fewest rooms first, then idle longest (never assigned first), then id. */
  preference(): Agent[] {
    return [...this.agents.values()]
      .filter((a) => this.eligible(a))
      .sort(
        (x, y) =>
          x.load + x.externalLoad - (y.load + y.externalLoad) ||
          (x.lastAssignedAt ?? -Infinity) - (y.lastAssignedAt ?? -Infinity) ||
          x.id - y.id,
      );
  }

  /** may_serve(): the room has no route, or has overflowed, or shares a division with the agent. */
  mayServe(s: Session, a: Agent): boolean {
    return s.divisionIds === null || this.overflowed(s) || s.divisionIds.some((d) => a.divisions.includes(d));
  }

  overflowed(s: Session): boolean {
    return s.overflowAt !== null && s.overflowAt <= this.hour;
  }

  /** route_for(): the first matching route by (position, id); null: none matches (any agent). */
  routeFor(s: Session): { divisionIds: number[]; overflowAt: number | null } | null {
    const r = [...this.routes]
      .sort((x, y) => x.position - y.position || x.id - y.id)
      .find((q) => (q.source === null || q.source === s.source) && (q.channel === null || q.channel === s.channel));
    return r ? { divisionIds: r.divisions, overflowAt: r.overflowHours === null ? null : s.queuedHour + r.overflowHours } : null;
  }

  /**
   * takeable()'s last clause: a room whose last try was with another agent (the call may have reached Qiscus)
   * waits for that agent while it can take the room: eligible, and may serve it (routes or membership may have
   * changed since).
   */
  notWaitingForLast(s: Session, a: Agent): boolean {
    if (s.lastAgentId === null || s.lastAgentId === a.id) return true;
    const last = this.agents.get(s.lastAgentId);
    return !(this.eligible(last) && this.mayServe(s, last));
  }

  lastSession(room: string): Session | undefined {
    for (let i = this.sessions.length - 1; i >= 0; i--) if (this.sessions[i]!.room === room) return this.sessions[i];
    return undefined;
  }

  due(s: Session): boolean {
    return s.nextAt <= this.now;
  }

  /** allocator.queue: waiting rooms in serving order (priority is always 0 here, so arrival order = id order). */
  queue(): Session[] {
    return this.sessions.filter((s) => s.state === 'waiting');
  }

  /**
   * Held rooms that reserve() may pick first: the due ones with the earliest next_attempt_at, in id order (as the
   * SQL orders them).
   */
  heldCandidates(): Session[] {
    const held = this.sessions.filter((s) => s.state === 'waiting' && s.holdsSlot && this.due(s));
    const first = Math.min(...held.map((s) => s.nextAt));
    return held.filter((s) => s.nextAt === first).sort((a, b) => a.id - b.id);
  }

  private agent(id: number | null): Agent {
    const a = id === null ? undefined : this.agents.get(id);
    if (!a) throw new Error(`model: no agent ${id}`);
    return a;
  }

  private releaseSlot(agentId: number | null): void {
    const a = this.agent(agentId);
    if (a.load <= 0) throw new Error(`model: agent ${a.id} load would go below 0`);
    a.load -= 1;
  }

  // ---------------------------------------------------------------------------------------------------------------
  // Webhooks

  /** accept_new_request(payload with room_id, latest_service.id = prior, source, channel.id). */
  acceptNewRequest(room: string, prior: number | null, source = 'qiscus', channel: number | null = null): WebhookResult {
    const last = this.lastSession(room);
    if (last?.state === 'waiting') return { outcome: 'already_queued', sessionId: last.id };
    if (last?.state === 'reserved' || last?.state === 'assigned') return { outcome: 'already_assigned', sessionId: last.id };
    if (last?.state === 'resolved' && last.priorServiceId === prior) return { outcome: 'duplicate', sessionId: last.id };
    if (this.rules.lateNewRequestCopy === 'spec') {
      const opened = this.sessions.find((s) => s.room === room && s.state === 'resolved' && s.priorServiceId === prior);
      if (opened) return { outcome: 'duplicate', sessionId: undefined /* not compared */ };
    }
    const s: Session = {
      id: this.sessions.length + 1,
      room,
      state: 'waiting',
      priorServiceId: prior,
      serviceId: null,
      agentId: null,
      attemptId: null,
      attempts: 0,
      excluded: [],
      holdsSlot: false,
      uncertain: false,
      lastAgentId: null,
      nextAt: this.now,
      gaveUp: null,
      lateServiceId: null,
      lateLandingAt: null,
      source,
      channel,
      queuedHour: this.hour,
      divisionIds: null,
      overflowAt: null,
    };
    this.route(s);
    this.sessions.push(s);
    // follow_late_call: the previous session was resolved while a call of ours was out; that call may put its agent
    // in the room after the resolution, serving this customer
    if (last?.state === 'resolved' && last.attemptId !== null) {
      s.nextAt = Infinity; // waits for the call's answer (settleResolvedInFlight), at most a second past its lease
    } else if (
      last?.state === 'resolved' &&
      ((last.lateServiceId !== null && prior !== last.lateServiceId) ||
        (last.lateServiceId === null && last.lateLandingAt !== null && last.lateLandingAt > this.lastPullAt))
    ) {
      const a = this.agent(last.agentId); // it (may have) landed late: this session takes over the count, held
      if (a.externalLoad > 0 && a.load + a.externalLoad <= this.capacity(a)) {
        a.load += 1;
        a.externalLoad -= 1;
        last.lateServiceId = null;
        this.holdFor(s, a.id);
      }
    }
    return { outcome: 'queued', sessionId: s.id };
  }

  /** accept_close_request(payload with service.room_id, service.id = service). */
  acceptCloseRequest(room: string, service: number | null, by: number | null = null): WebhookResult {
    if (service !== null) this.resolutionsStored.add(`${room}:${service}`); // every webhook is stored
    // the resolution of a service a late call opened: the count it added on the agent goes (once per agent), and
    // the webhook is 'resolved' whatever else it does; then it applies like any other resolution
    const late = this.sessions.filter((s) => s.room === room && service !== null && s.lateServiceId === service);
    for (const a of new Set(late.map((s) => this.agent(s.agentId)))) a.externalLoad = Math.max(a.externalLoad - 1, 0);
    for (const s of late) {
      s.lateServiceId = null;
      s.lateLandingAt = null;
    }
    const closesNothing = late.length > 0 ? 'resolved' : 'already_resolved';
    const last = this.lastSession(room);
    if (!last) return { outcome: 'unknown_room', sessionId: null };
    if (!OPEN.has(last.state)) return { outcome: closesNothing, sessionId: last.id };
    if (
      this.rules.repeatedResolution === 'spec' &&
      service !== null &&
      (last.priorServiceId === service ||
        this.sessions.some((s) => s.room === room && s.state === 'resolved' && s.serviceId === service))
    ) {
      return { outcome: closesNothing, sessionId: undefined /* not compared */ };
    }
    // the resolution of an earlier service than the one the agent holds now (Qiscus numbers services in order):
    // a call of ours opened the newer one after it, and the session stays open
    if (service !== null && last.state === 'assigned' && last.serviceId !== null && service < last.serviceId) {
      return { outcome: late.length > 0 ? 'resolved' : 'earlier_service', sessionId: last.id };
    }
    // a reserved room keeps its slot and attempt until the call in flight reports back (settleResolvedInFlight),
    // unless its agent resolved it: then our assignment landed before, and the slot is free now
    const landed = last.state === 'reserved' && !last.uncertain && by !== null && by === last.agentId;
    if (last.holdsSlot) this.letGoSlot(last, by);
    else if (last.state === 'assigned' || landed) this.releaseSlot(last.agentId);
    if (landed) this.attempts[last.attemptId! - 1]!.outcome = 'resolved';
    if (last.state !== 'reserved' || landed) last.attemptId = null;
    last.state = 'resolved';
    last.holdsSlot = false;
    last.uncertain = false;
    last.serviceId = service ?? last.serviceId;
    return { outcome: 'resolved', sessionId: last.id };
  }

  // ---------------------------------------------------------------------------------------------------------------
  // Reservation

  /**
   * reserve(): a held room back to its own agent first; else the best eligible agent (preference order) that has
   * a room: the oldest due waiting room not holding a slot, not refused by that agent, and not to be retried with
   * another agent that is eligible. `pickHeld` chooses among tied held rooms (see heldCandidates).
   */
  reserve(): Reservation | null {
    if (!this.sessions.some((s) => s.state === 'waiting' && this.due(s))) return null;
    // overflow_due(): rooms whose overflow time passed go to the queue for anyone
    for (const s of this.queue()) if (this.overflowed(s)) Object.assign(s, { divisionIds: null, overflowAt: null });

    // held rooms in (next_attempt_at, id) order: back to an online agent, or let go (then the next is looked at)
    for (let tied = this.heldCandidates(); tied.length > 0; tied = this.heldCandidates()) {
      const s = tied[0]!;
      if (this.online(this.agents.get(s.agentId!))) return this.reserveFor(s, s.agentId!);
      // its agent went offline or vanished: let the slot go, and the room queues like any other
      this.letGoSlot(s);
      s.holdsSlot = false;
      s.uncertain = false;
    }

    for (const candidate of this.preference()) {
      const s = this.sessions.find(
        (q) =>
          q.state === 'waiting' &&
          !q.holdsSlot &&
          this.due(q) &&
          !q.excluded.includes(candidate.id) &&
          this.mayServe(q, candidate) &&
          this.notWaitingForLast(q, candidate),
      );
      if (!s) continue;
      candidate.load += 1; // take_slot
      candidate.lastAssignedAt = this.now;
      return this.reserveFor(s, candidate.id);
    }
    return null;
  }

  private reserveFor(s: Session, agentId: number): Reservation {
    const attempt: Attempt = { id: this.attempts.length + 1, sessionId: s.id, agentId, number: s.attempts + 1, outcome: null };
    this.attempts.push(attempt);
    s.state = 'reserved';
    s.agentId = agentId;
    s.attemptId = attempt.id;
    s.attempts += 1;
    s.uncertain = s.holdsSlot;
    s.holdsSlot = false;
    return { attemptId: attempt.id, sessionId: s.id, room: s.room, agentId, attempt: s.attempts };
  }

  /** The session of a reservation, if the reservation is still current (lock_reservation). */
  private current(attemptId: number): Session | undefined {
    const a = this.attempts[attemptId - 1];
    const s = a && this.sessions[a.sessionId - 1];
    return s && s.state === 'reserved' && s.attemptId === attemptId ? s : undefined;
  }

  // ---------------------------------------------------------------------------------------------------------------
  // Outcomes of a reservation

  confirm(attemptId: number, service: number | null): boolean {
    let s = this.current(attemptId);
    const a = this.attempts[attemptId - 1];
    if (!s) {
      this.settleResolvedInFlight(attemptId, true, service);
      if (a && a.outcome === null) a.outcome = 'stale';
      // a rescued room waiting for the retry with this agent: the answer says the retry would only repeat it
      const rescued = a && this.sessions[a.sessionId - 1];
      if (!rescued || rescued.state !== 'waiting' || !rescued.holdsSlot || rescued.agentId !== a.agentId) return false;
      s = rescued;
      s.holdsSlot = false;
    } else {
      a!.outcome = 'assigned';
    }
    s.state = 'assigned';
    s.attemptId = null;
    s.uncertain = false;
    s.serviceId = service ?? s.serviceId;
    return true;
  }

  /** fail_transient: backoff (never over within a run). `maybeAssigned`: the slot stays held for the retry;
   * `unanswered`: no answer came (a timeout), the call may still land. */
  failTransient(attemptId: number, maybeAssigned: boolean, unanswered = false): Outcome | null {
    const s = this.current(attemptId);
    if (!s) return this.settleResolvedInFlight(attemptId, maybeAssigned, null, maybeAssigned && unanswered), null;
    return this.requeue(s, attemptId, 'transient', Infinity, null, true, maybeAssigned, maybeAssigned && unanswered);
  }

  /** fail_for_agent: that agent never gets the room again; due at once. */
  failForAgent(attemptId: number): Outcome | null {
    const s = this.current(attemptId);
    if (!s) return this.settleResolvedInFlight(attemptId, false), null;
    return this.requeue(s, attemptId, 'refused', this.now, s.agentId, true, false);
  }

  /** release: not counted as an attempt; due at once, or after a delay longer than any run. */
  release(attemptId: number, delayed: boolean, maybeAssigned: boolean): Outcome | null {
    const s = this.current(attemptId);
    // a call that may have gone through is still out (a listener shutting down): unanswered
    if (!s) return this.settleResolvedInFlight(attemptId, maybeAssigned, null, maybeAssigned), null;
    return this.requeue(s, attemptId, 'released', delayed ? Infinity : this.now, null, false, maybeAssigned, maybeAssigned);
  }

  /** Every reservation's lease ends, then rescue_expired(): back to the queue at once, holding the slot. */
  expireLeases(): number {
    const reserved = this.sessions.filter((s) => s.state === 'reserved');
    for (const s of reserved) this.requeue(s, s.attemptId!, 'expired', this.now, null, true, true);
    const inFlight = this.sessions.filter((s) => s.state === 'resolved' && s.attemptId !== null);
    for (const s of inFlight) this.settleResolvedInFlight(s.attemptId!, true); // the lease is over: answered or not
    return reserved.length + inFlight.length;
  }

  /**
   * A room resolved while its call was in flight: when the call reports back (or its lease ends), its slot is
   * freed if the call did not land or its answer names the resolved service; else it moves to the agent's by-hand
   * count until the next roster pull (every pull here starts after the call ended).
   */
  private settleResolvedInFlight(attemptId: number, maybeLanded: boolean, service: number | null = null, unanswered = false): boolean {
    const s = this.sessions.find((q) => q.state === 'resolved' && q.attemptId === attemptId);
    if (!s) {
      // stale: but an answer, however late, says the call is over (current_reservation)
      const a = this.attempts[attemptId - 1];
      if (a && !unanswered) a.unanswered = false;
      return false;
    }
    // first, so that mayLand sees this call among the room's
    Object.assign(this.attempts[attemptId - 1]!, { outcome: 'resolved', unanswered });
    const agent = this.agents.get(s.agentId!)!;
    // the room's newer session, queued while the call was out (the customer wrote again)
    let newer = this.sessions.find((q) => q.room === s.room && q.id > s.id && q.state === 'waiting' && !q.holdsSlot);
    // a new service whose resolution is stored already: it landed, then was resolved
    const resolvedAlready = service !== null && this.resolutionsStored.has(`${s.room}:${service}`);
    if (maybeLanded && (service === null || service !== s.serviceId) && !resolvedAlready) {
      if (newer && (service === null || newer.priorServiceId !== service)) {
        this.holdFor(newer, agent.id); // the agent may be in the room, serving it: it takes over the slot
        s.lateLandingAt = this.now;
        newer = undefined;
      } else {
        agent.load -= 1;
        agent.externalLoad += 1;
        // no answer: this call, or an earlier one, may still land until its lease ends (an hour here)
        if (this.mayLand(s)) agent.heldCount += 1;
        s.lateServiceId = service; // its own resolution frees the count (acceptCloseRequest)
        s.lateLandingAt = this.now;
      }
    } else {
      this.releaseSlot(s.agentId);
    }
    // a newer session that waited for this answer is due now (never reserved: not one backing off)
    if (newer && newer.nextAt > this.now && !this.attempts.some((x) => x.sessionId === newer!.id)) newer.nextAt = this.now;
    s.attemptId = null;
    return true;
  }

  /**
   * may_land_until() is not null: a call of ours for the room to the session's agent got no answer (leases of an hour
   * here), unless that agent resolved the room (`by`) and it was the room's only call to it.
   */
  private mayLand(s: Session, by: number | null = null): boolean {
    const calls = this.attempts.filter((x) => x.agentId === s.agentId && this.sessions[x.sessionId - 1]!.room === s.room);
    return calls.some((x) => x.unanswered) && !(by !== null && by === s.agentId && calls.length === 1);
  }

  /**
   * let_go_slot(): a session lets go of its agent's slot: free, unless a call of ours may still land (mayLand); then
   * a by-hand count held until a pull after that lease (hand_slot_to_qiscus).
   */
  private letGoSlot(s: Session, by: number | null = null): void {
    if (!this.mayLand(s, by)) return this.releaseSlot(s.agentId);
    const agent = this.agents.get(s.agentId!)!;
    agent.load -= 1;
    agent.externalLoad += 1;
    agent.heldCount += 1;
    s.lateLandingAt = this.now;
  }

  /** hold_for(): the waiting session holds a slot of `agentId` already counted for it; its call goes there first. */
  private holdFor(s: Session, agentId: number): void {
    s.holdsSlot = true;
    s.uncertain = true;
    s.agentId = agentId;
    s.lastAgentId = agentId;
    s.nextAt = this.now;
  }

  /** Enough time passes for every pending backoff to end. */
  timePasses(): void {
    for (const s of this.sessions) if (s.state === 'waiting' && s.nextAt > this.now) s.nextAt = this.now;
  }

  /** requeue(): back to the queue at the same place, or failed when out of attempts or refused by every agent. */
  private requeue(
    s: Session,
    attemptId: number,
    how: string,
    notBefore: number,
    exclude: number | null,
    countAttempt: boolean,
    hold: boolean,
    unanswered = false,
  ): Outcome {
    this.attempts[attemptId - 1]!.outcome = how;
    this.attempts[attemptId - 1]!.unanswered = unanswered;
    const excluded = exclude === null ? s.excluded : [...s.excluded.filter((x) => x !== exclude), exclude];
    const tries = s.attempts - (countAttempt ? 0 : 1);
    const nobodyLeft = ![...this.agents.values()].some(
      (a) => a.type === 'agent' && a.present && !excluded.includes(a.id),
    );
    const refusedByAll = nobodyLeft && (this.rules.giveUpWithoutRefusal === 'sql' || excluded.length > 0);
    const giveUp = tries >= this.maxAttempts || refusedByAll;
    s.gaveUp = tries >= this.maxAttempts ? 'attempts' : refusedByAll ? 'refused' : null;
    const keep = (hold || s.uncertain) && exclude === null; // once uncertain, held until confirmed or refused
    if (giveUp || !keep) this.letGoSlot(s);
    s.state = giveUp ? 'failed' : 'waiting';
    s.holdsSlot = !giveUp && keep;
    s.uncertain = !giveUp && keep;
    s.attempts = tries;
    s.excluded = excluded;
    s.lastAgentId = exclude === null ? s.agentId : null;
    s.nextAt = notBefore;
    s.attemptId = null;
    return s.state === 'failed' ? 'failed' : 'waiting';
  }

  // ---------------------------------------------------------------------------------------------------------------
  // Roster and settings

  /** Our rooms Qiscus surely counts (sync_agents with started_at = now(): every assigned room of the agent). */
  ours(agentId: number): number {
    return this.sessions.filter((s) => s.agentId === agentId && s.state === 'assigned').length;
  }

  /**
   * The agent's rooms Qiscus may count or not: calls in flight (reserved, or resolved with the call still out) and
   * rooms waiting for their retry after an ambiguous failure (holding the slot). sync_agents' `uncertain` also has
   * the rooms confirmed, or resolved after being assigned or while in flight, at or after the pull's started_at
   * (whenever they were reserved); the harness pulls with started_at = now(), after every earlier command, so
   * none of those are left and the rule is this one. (An earlier started_at is tested in test/sql/core.test.ts.)
   */
  inFlight(agentId: number): number {
    return this.sessions.filter(
      (s) => s.agentId === agentId && (s.attemptId !== null || (s.state === 'waiting' && s.holdsSlot)),
    ).length;
  }

  /**
   * sync_agents(roster, now(), complete): upsert every listed agent (present again), with
   * external_load = max(current_customer_count - ours, 0), lowered only when two syncs agree; with `complete`,
   * unlisted agents vanish.
   * Returns how many rows were inserted or changed.
   */
  syncAgents(roster: RosterEntry[], complete: boolean): number {
    let changed = 0;
    for (const e of roster) {
      const ext = Math.max(e.count - this.ours(e.id), 0);
      // the lowest the count can truly be (calls in flight may not be in Qiscus's count): what the next pull compares with
      const seen = Math.max(e.count - this.ours(e.id) - this.inFlight(e.id), 0);
      const a = this.agents.get(e.id);
      if (!a) {
        this.agents.set(e.id, {
          id: e.id, type: e.type, isAvailable: e.isAvailable, forceOffline: e.forceOffline, present: true,
          paused: false, maxLoad: null, load: 0, externalLoad: ext, externalSeen: seen, pulledOurs: this.ours(e.id),
          qiscusLoad: e.count,
          lastAssignedAt: null,
          heldCount: 0,
          divisions: [],
        });
        changed += 1;
        continue;
      }
      // up at once; down at once when none of ours was subtracted, else as far as the previous pull agrees, and
      // never below the late landings whose service's resolution has not come
      const late = this.sessions.filter((q) => q.agentId === e.id && q.lateServiceId !== null).length;
      const external =
        ext >= a.externalLoad ? ext : Math.max(ext, this.ours(e.id) > 0 ? Math.max(Math.min(a.externalLoad, a.externalSeen), late) : 0);
      // never below the held counts (every pull here starts after the last hand, so only those)
      const held = Math.max(external, Math.min(a.heldCount, a.externalLoad));
      const same =
        a.type === e.type && a.isAvailable === e.isAvailable && a.forceOffline === e.forceOffline && a.present &&
        a.qiscusLoad === e.count && a.externalLoad === held && a.externalSeen === seen &&
        a.pulledOurs === this.ours(e.id);
      if (!same) changed += 1;
      Object.assign(a, { type: e.type, isAvailable: e.isAvailable, forceOffline: e.forceOffline, present: true,
        qiscusLoad: e.count, externalLoad: held, externalSeen: seen, pulledOurs: this.ours(e.id) });
    }
    if (complete) {
      this.lastPullAt = this.now;
      const listed = new Set(roster.map((e) => e.id));
      for (const a of this.agents.values()) if (!listed.has(a.id)) a.present = false;
    }
    return changed;
  }

  /**
   * sync_divisions(divisions, members): `members` maps each listed division to its agents; agents not in
   * allocator.agents are left out. Returns how many agents' divisions changed.
   */
  syncDivisions(members: Map<number, number[]>): number {
    let changed = 0;
    for (const a of this.agents.values()) {
      const divisions = [...members].filter(([, ids]) => ids.includes(a.id)).map(([d]) => d).sort((x, y) => x - y);
      if (divisions.join() !== a.divisions.join()) changed += 1;
      a.divisions = divisions;
    }
    return changed;
  }

  /** A new session takes its route (trigger place_new_session). */
  private route(s: Session): void {
    const r = this.routeFor(s);
    s.divisionIds = r?.divisionIds ?? null;
    s.overflowAt = r?.overflowAt ?? null;
  }

  /** insert into allocator.routes; then every room waiting or reserved takes its route anew (reroute_waiting). */
  addRoute(r: Omit<Route, 'id'>): Route {
    const route = { id: ++this.routeIds, ...r };
    this.routes.push(route);
    this.reroute();
    return route;
  }

  /** update allocator.routes (every column but id) where id = `id`. */
  changeRoute(id: number, r: Omit<Route, 'id'>): void {
    const i = this.routes.findIndex((q) => q.id === id);
    if (i >= 0) this.routes[i] = { id, ...r };
    this.reroute();
  }

  deleteRoute(id: number): void {
    this.routes = this.routes.filter((q) => q.id !== id);
    this.reroute();
  }

  private reroute(): void {
    for (const s of this.sessions) if (s.state === 'waiting' || s.state === 'reserved') this.route(s);
  }

  /** An hour passes for the rooms' overflow (queued_at and overflow_at an hour back). */
  hourPasses(): void {
    this.hour += 1;
  }

  setAgentMaxLoad(agentId: number, maxLoad: number | null): void {
    const a = this.agents.get(agentId);
    if (a) a.maxLoad = maxLoad;
  }

  setPaused(agentId: number, paused: boolean): void {
    const a = this.agents.get(agentId);
    if (a) a.paused = paused;
  }
}
