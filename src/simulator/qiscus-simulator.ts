import { createServer, STATUS_CODES, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

/*
 * A fake Qiscus Omnichannel for tests, the demo and benchmarks: a real HTTP server speaking the two API routes
 * the allocator uses (agents list, assign_agent) in the shapes of test/fixtures/*.json, keeping room/agent state
 * so tests can check what Qiscus would show, sending the two webhooks on demand, and injecting faults.
 * Node runs each handler's synchronous part to completion, so state changes are atomic without locks.
 */

export interface SimAgentInit {
  id: number;
  name?: string;
  email?: string;
  is_available?: boolean;
  force_offline?: boolean;
  /** "agent" (default) serves rooms; "admin" / "supervisor" are listed but cannot be assigned. */
  type_as_string?: string;
  /** Divisions the agent is in (see SimulatorOptions.divisions). */
  divisions?: number[];
}

export interface SimAgent {
  id: number;
  name: string;
  email: string;
  is_available: boolean;
  force_offline: boolean;
  type_as_string: string;
  /** Divisions the agent is in. */
  divisions: number[];
  /** Rooms the agent holds now, in the order they were taken. */
  rooms: string[];
}

export type FaultKind = 'latency' | 'error' | 'rate429' | 'hang' | 'acceptThenFail' | 'reject' | 'script';

export interface ScriptStep {
  status: number;
  /** Answer body: a string is sent raw (for garbage answers), anything else as JSON. */
  body?: unknown;
  headers?: Record<string, string>;
  /** Never answer (the socket stays open until the client gives up or the simulator closes). */
  hang?: boolean;
  /** Perform the assignment before answering `status` (with `hang`: perform, then never answer). */
  accept?: boolean;
  /** Wait this long between deciding (and, with `accept`, performing) and answering; overrides `Faults.answerDelayMs`. */
  answerDelayMs?: number;
}

export interface Faults {
  /** Delay before each affected request is handled: fixed, or uniform in [min, max]. */
  latencyMs: number | [number, number];
  /** Probability of answering 500/502/503 without doing anything. */
  errorRate: number;
  /** Probability of answering 429 with `Retry-After: retryAfterSeconds`. */
  rate429: number;
  retryAfterSeconds: number;
  /** Probability of never answering. */
  hangRate: number;
  /** Probability of performing the assignment and then answering 500 (the ambiguous case). */
  acceptThenFailRate: number;
  /** Assigning to these agents answers 400 "agent cannot be assigned". */
  rejectAgents: Set<number>;
  /** One-shot answers consumed in order by the next assign_agent calls, before any random fault. */
  script: ScriptStep[];
  /** Also apply latency / hang / 429 / 5xx to the agents list. */
  faultsOnList: boolean;
  /** Delay before each agents-list page is answered, whatever the other faults (a slow roster pull). */
  listLatencyMs: number;
  /**
   * Delay between deciding an assign call (performing it, for a success) and sending its answer: fixed, or uniform
   * in [min, max]. With `latencyMs` (the delay before deciding) this splits a slow call into "not yet at Qiscus" and
   * "done at Qiscus, answer still on its way", so a listener killed meanwhile loses some answers of calls that landed.
   */
  answerDelayMs: number | [number, number];
  /**
   * An assign call whose client went away (timed out, was killed) before the simulator decided it is dropped:
   * nothing is performed or logged (it never reached Qiscus). Counted in `droppedCalls`. Off: such calls are still
   * performed, as a server that does not notice the disconnect would.
   */
  dropIfClientGone: boolean;
}

export interface AssignmentLogEntry {
  room_id: string;
  agent_id: number;
  /** Date.now() when the answer was decided. */
  at: number;
  /** HTTP status answered; 0 when the request was left hanging. */
  status: number;
  fault?: FaultKind;
  /** True when the room already had this agent (idempotent repeat: 200, nothing changed). */
  repeat?: boolean;
  /** The room's session (1 = first service, +1 after each resolution). */
  session: number;
  /** True when this call put the agent in the room, whatever it answered (a 200, or an accept-then-fail). */
  performed?: boolean;
  /** Date.now() when the request (its body read) reached the simulator. */
  receivedAt?: number;
  /** Date.now() when the answer was written; absent while it is delayed, and for calls never answered. */
  answeredAt?: number;
}

/** An assignment the simulator has just performed (see `onAssigned`, `resolveOnAssign`). */
export interface PerformedAssignment {
  roomId: string;
  agentId: number;
  /** The service the agent was put in: the `data.service.id` of a 200 answer, and of the resolution webhook. */
  serviceId: number;
  session: number;
}

/** A resolution posted by `resolveOnAssign`, with how our app answered it. */
export interface AutoResolution {
  room_id: string;
  agent_id: number;
  service_id: number;
  /** Date.now() when the room was resolved (right after the assignment was performed). */
  at: number;
  /** HTTP status of the webhook; 0 until it is answered, or when it could not be delivered (see `error`). */
  status: number;
  body?: unknown;
  error?: string;
}

/** What `up()` reports about the outage it ends. */
export interface OutageReport {
  ms: number;
  /** Assign calls answered with the outage status meanwhile. */
  assignCalls: number;
  /** Agents-list requests answered with the outage status meanwhile (0 unless `down({ list: true })`). */
  listCalls: number;
}

export interface SimulatorStats {
  /** Requests by route ("GET /api/v2/admin/agents", "POST /api/v1/admin/service/assign_agent", "other") and status (0 = hung). */
  requests: Record<string, Record<number, number>>;
  faults: Record<FaultKind, number>;
  /** Successful API assignments to an agent who was offline (is_available false or force_offline). */
  assignedWhileOffline: number;
  /** Webhooks posted: new_request and close_request. */
  webhooks: Record<'new_request' | 'close_request', number>;
}

export interface WebhookResult {
  status: number;
  /** Parsed JSON when the answer was JSON, else the raw text. */
  body: unknown;
}

export interface SimulatorOptions {
  /** Divisions (teams): id → name. Agents join them through `SimAgentInit.divisions` or `setAgentDivisions`. */
  divisions?: Record<number, string>;
  port?: number;
  host?: string;
  appId?: string;
  secretKey?: string;
  agents?: SimAgentInit[];
  webhookBaseUrl?: string;
  webhookSecret?: string;
  faults?: Partial<Faults>;
  /** Seed for random faults, so a run can be reproduced. Random when absent (see `sim.seed`). */
  seed?: number;
  /** See `Simulator.onAssigned`. */
  onAssigned?: (a: PerformedAssignment) => void;
  /** See `Simulator.resolveOnAssign`. */
  resolveOnAssign?: boolean | { by?: number };
}

export interface Simulator {
  readonly url: string;
  readonly port: number;
  readonly seed: number;
  /** Where webhooks go; may be changed after start (e.g. once the app's port is known). */
  webhookBaseUrl: string | undefined;
  webhookSecret: string | undefined;
  /** Live fault settings; mutate freely or use setFaults. */
  faults: Faults;
  setFaults(partial: Partial<Faults>): void;
  /** Back to no faults at all (empties the script too). */
  clearFaults(): void;
  readonly assignments: AssignmentLogEntry[];
  readonly stats: SimulatorStats;

  agents(): SimAgent[];
  roomsOf(agentId: number): string[];
  agentOf(roomId: string): number | null;
  maxLoadSeen(agentId: number): number;
  maxLoadSeenAll(): number;
  /** Successful, non-repeated API assignments of the room in its current (latest) session. */
  assignCount(roomId: string): number;

  /**
   * Called synchronously each time an assign call puts an agent in a room (not for repeats), before the answer is
   * sent: a test may resolve the room here (`sim.resolve`), so that the resolution is in flight with the answer.
   */
  onAssigned: ((a: PerformedAssignment) => void) | undefined;
  /**
   * Resolve every room the moment an assign call puts an agent in it, as a very quick agent would: the room is
   * resolved in the simulator at once and the close_request webhook is posted in the background, with
   * `resolved_by` the assigned agent (or `by`) and the service id of the assignment. The assign answer is not
   * delayed by it. Each one is recorded in `autoResolutions`.
   */
  resolveOnAssign: boolean | { by?: number };
  readonly autoResolutions: AutoResolution[];
  /** Agents-list requests as they arrived: time and page. */
  readonly listRequests: Array<{ at: number; page: number }>;
  /** Assign calls received and not answered yet whose client is still there: not yet decided, and performed. */
  inFlight(): { notPerformed: number; performed: number };
  /** Assign calls dropped because their client went away first (`Faults.dropIfClientGone`). */
  readonly droppedCalls: number;
  /**
   * Qiscus is down from now on: every assign call is answered `status` (503) and does nothing, before any script
   * step or fault (with `list`, the agents list too). Until `up()`.
   */
  down(opts?: { status?: number; list?: boolean }): void;
  /** Ends the outage begun by `down()` and says how long it lasted and how many calls it answered. */
  up(): OutageReport;
  /** The outage under way, if any. */
  readonly outage: (OutageReport & { since: number }) | null;

  addAgent(a: SimAgentInit): void;
  setAgent(id: number, patch: Partial<Omit<SimAgentInit, 'id'>>): void;
  /** A division appears (or is renamed) in Qiscus; `removeDivision` deletes it. */
  addDivision(id: number, name?: string): void;
  removeDivision(id: number): void;
  /** The agent is now in exactly these divisions. */
  setAgentDivisions(agentId: number, divisionIds: number[]): void;
  /** The agent vanishes from the list; rooms it held are left without an agent. */
  removeAgent(id: number): void;
  /** Put a room on an agent as a supervisor would in the dashboard (moves it if it had another agent). */
  assignByHand(roomId: string, agentId: number): void;

  resolve(roomId: string, opts?: { by?: number; notes?: string | null }): Promise<WebhookResult>;
  sendNewRequest(
    roomId: string,
    opts?: { name?: string; email?: string; source?: string; extras?: Record<string, unknown> },
  ): Promise<WebhookResult>;

  close(): Promise<void>;
}

const LIST_ROUTE = 'GET /api/v2/admin/agents';
const DIVISIONS_ROUTE = 'GET /api/v2/divisions';
const DIVISION_AGENTS_ROUTE = 'GET /api/v2/admin/agents/by_division';
const ASSIGN_ROUTE = 'POST /api/v1/admin/service/assign_agent';
const FIRST_SERVICE_ID = 115830000;
// Who resolves a room nobody holds (an admin in the dashboard): an id no test gives an agent.
const ADMIN_ID = 900_001;
const MAX_BODY_BYTES = 1 << 20;
const WEBHOOK_TIMEOUT_MS = 10_000;

interface AgentState extends Omit<SimAgent, 'rooms'> {
  rooms: Set<string>;
  createdAt: string;
}

interface Service {
  id: number;
  room_id: string;
  is_resolved: boolean;
  notes: string | null;
  first_comment_id: string;
  last_comment_id: string;
  source: string;
  created_at: Date;
  resolved_at: Date | null;
  resolved_by: number | null;
}

interface RoomState {
  id: string;
  agents: Set<number>;
  customer: { name: string; email: string; avatar: string };
  source: string;
  extras: Record<string, unknown>;
  open: Service | null;
  lastResolved: Service | null;
  lastAgentId: number | null;
  session: number;
  assignCount: number;
}

type Answer = { status: number; body: unknown; headers?: Record<string, string> };

function defaultFaults(): Faults {
  return {
    latencyMs: 0,
    errorRate: 0,
    rate429: 0,
    retryAfterSeconds: 1,
    hangRate: 0,
    acceptThenFailRate: 0,
    rejectAgents: new Set(),
    script: [],
    faultsOnList: false,
    listLatencyMs: 0,
    answerDelayMs: 0,
    dropIfClientGone: false,
  };
}

/** mulberry32: tiny, fast, good enough to make fault sequences reproducible. */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const isoSeconds = (d: Date) => d.toISOString().replace(/\.\d{3}Z$/, 'Z');
const sqlTime = (d: Date) => d.toISOString().slice(0, 19).replace('T', ' ');
const typeNumber = (t: string) => (t === 'admin' ? 1 : t === 'agent' ? 2 : t === 'supervisor' ? 3 : 0);
const roleName = (t: string) => (t ? t[0]!.toUpperCase() + t.slice(1) : 'Unknown');

export async function startSimulator(opts: SimulatorOptions = {}): Promise<Simulator> {
  const host = opts.host ?? '127.0.0.1';
  const appId = opts.appId;
  const secretKey = opts.secretKey;
  const appCode = appId ?? 'sim-app';
  const seed = opts.seed ?? Math.floor(Math.random() * 2 ** 32);
  const rand = mulberry32(seed);
  const startedAt = new Date();

  const agentMap = new Map<number, AgentState>();
  const divisionMap = new Map<number, string>(Object.entries(opts.divisions ?? {}).map(([id, name]) => [Number(id), name]));
  const rooms = new Map<string, RoomState>();
  const maxLoad = new Map<number, number>();
  let maxLoadAll = 0;
  let nextServiceId = FIRST_SERVICE_ID;
  let nextCommentId = 2487134000;
  const assignments: AssignmentLogEntry[] = [];
  const stats: SimulatorStats = {
    requests: {},
    faults: { latency: 0, error: 0, rate429: 0, hang: 0, acceptThenFail: 0, reject: 0, script: 0 },
    assignedWhileOffline: 0,
    webhooks: { new_request: 0, close_request: 0 },
  };
  const faults: Faults = { ...defaultFaults(), ...opts.faults };

  const timers = new Set<NodeJS.Timeout>();
  let closed = false;
  const autoResolutions: AutoResolution[] = [];
  const listRequests: Array<{ at: number; page: number }> = [];
  /** Assign calls under way: whether they have been performed yet. */
  const pending = new Set<{ performed: boolean }>();
  let droppedCalls = 0;
  let outage: { since: number; status: number; list: boolean; assignCalls: number; listCalls: number } | null = null;

  // ---------- state helpers ----------

  function makeAgent(a: SimAgentInit): AgentState {
    const name = a.name ?? `Agent ${a.id}`;
    return {
      id: a.id,
      name,
      email: a.email ?? `agent${a.id}@example.com`,
      is_available: a.is_available ?? true,
      force_offline: a.force_offline ?? false,
      type_as_string: a.type_as_string ?? 'agent',
      divisions: [...(a.divisions ?? [])],
      rooms: new Set(),
      createdAt: isoSeconds(startedAt),
    };
  }

  function addAgent(a: SimAgentInit): void {
    if (agentMap.has(a.id)) throw new Error(`simulator: agent ${a.id} already exists`);
    agentMap.set(a.id, makeAgent(a));
  }
  for (const a of opts.agents ?? []) addAgent(a);

  function mustAgent(id: number): AgentState {
    const a = agentMap.get(id);
    if (!a) throw new Error(`simulator: unknown agent ${id}`);
    return a;
  }

  function nextComment(): string {
    return String(nextCommentId++);
  }

  function room(roomId: string): RoomState {
    let r = rooms.get(roomId);
    if (!r) {
      r = {
        id: roomId,
        agents: new Set(),
        customer: {
          name: `cust-${roomId}`,
          email: `cust-${roomId}@example.com`,
          avatar: 'https://omnichannel.qiscus.com/img/ic_qiscus_client.png',
        },
        source: 'qiscus',
        extras: { timezone_offset: 7 },
        open: null,
        lastResolved: null,
        lastAgentId: null,
        session: 0,
        assignCount: 0,
      };
      rooms.set(roomId, r);
    }
    return r;
  }

  /** The room's open service; a room with none (new, or resolved before) starts a new session. */
  function openService(r: RoomState): Service {
    if (r.open) return r.open;
    r.session += 1;
    r.assignCount = 0;
    r.open = {
      id: nextServiceId++,
      room_id: r.id,
      is_resolved: false,
      notes: null,
      first_comment_id: nextComment(),
      last_comment_id: '0',
      source: r.source,
      created_at: new Date(),
      resolved_at: null,
      resolved_by: null,
    };
    return r.open;
  }

  function putOnAgent(r: RoomState, a: AgentState): void {
    r.agents.add(a.id);
    a.rooms.add(r.id);
    r.lastAgentId = a.id;
    const load = a.rooms.size;
    if (load > (maxLoad.get(a.id) ?? 0)) maxLoad.set(a.id, load);
    if (load > maxLoadAll) maxLoadAll = load;
  }

  function takeOffAgents(r: RoomState): void {
    for (const id of r.agents) agentMap.get(id)?.rooms.delete(r.id);
    r.agents.clear();
  }

  function snapshot(a: AgentState): SimAgent {
    const { createdAt: _c, rooms: rs, ...rest } = a;
    return { ...rest, rooms: [...rs] };
  }

  function listedAgent(a: AgentState) {
    return {
      avatar_url: null,
      created_at: a.createdAt,
      current_customer_count: a.rooms.size,
      email: a.email,
      force_offline: a.force_offline,
      id: a.id,
      is_available: a.is_available,
      last_login: isoSeconds(startedAt),
      name: a.name,
      sdk_email: `${appCode}_${a.email}`,
      sdk_key: `k${a.id}`,
      type: typeNumber(a.type_as_string),
      type_as_string: a.type_as_string,
      user_channels: [],
      user_roles: [{ id: typeNumber(a.type_as_string), name: roleName(a.type_as_string) }],
    };
  }

  function serviceJson(s: Service) {
    return {
      id: s.id,
      room_id: s.room_id,
      is_resolved: s.is_resolved,
      notes: s.notes,
      first_comment_id: s.first_comment_id,
      last_comment_id: s.last_comment_id,
      source: s.source,
    };
  }

  function assignAnswer(a: AgentState, s: Service): Answer {
    return {
      status: 200,
      body: {
        data: {
          added_agent: {
            id: a.id,
            name: a.name,
            email: a.email,
            sdk_email: `${appCode}_${a.email}`,
            is_available: a.is_available,
            type: typeNumber(a.type_as_string),
            type_as_string: a.type_as_string,
            avatar_url: null,
            is_verified: false,
            created_at: a.createdAt,
            updated_at: isoSeconds(new Date()),
          },
          service: serviceJson(s),
        },
        status: 200,
      },
    };
  }

  const errorAnswer = (status: number, errors: unknown): Answer => ({ status, body: { errors, status } });

  /** The real assign_agent semantics, no faults. */
  function performAssign(roomId: string, agentId: number, maxAgent: number): Answer & { repeat?: boolean } {
    const a = agentMap.get(agentId);
    if (!a || a.type_as_string !== 'agent') return errorAnswer(400, 'agent not found');
    const r = room(roomId);
    const s = openService(r);
    // Idempotent: a retry of a call that had gone through gets the same answer.
    if (r.agents.has(agentId)) return { ...assignAnswer(a, s), repeat: true };
    if (r.agents.size >= maxAgent) return errorAnswer(400, 'room already has the maximum number of agents');
    putOnAgent(r, a);
    r.assignCount += 1;
    // Qiscus lets an offline agent be assigned; the allocator should not do it, so it is counted.
    if (!a.is_available || a.force_offline) stats.assignedWhileOffline += 1;
    return assignAnswer(a, s);
  }

  // ---------- HTTP plumbing ----------

  function count(route: string, status: number): void {
    const byStatus = (stats.requests[route] ??= {});
    byStatus[status] = (byStatus[status] ?? 0) + 1;
  }

  function send(res: ServerResponse, route: string, a: Answer): void {
    count(route, a.status);
    if (res.destroyed || res.writableEnded) return; // the client gave up (e.g. timed out during latency)
    const raw = typeof a.body === 'string';
    const text = raw ? (a.body as string) : JSON.stringify(a.body ?? null);
    const type = !raw ? 'application/json' : text.trimStart().startsWith('<') ? 'text/html' : 'text/plain';
    res.writeHead(a.status, { 'content-type': type, 'content-length': Buffer.byteLength(text), ...a.headers });
    res.end(text);
  }

  /** Leave the request unanswered. close() destroys the socket (closeAllConnections), so it cannot outlive the server. */
  function hang(route: string): void {
    count(route, 0);
  }

  function sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        timers.delete(t);
        resolve();
      }, ms);
      timers.add(t);
    });
  }

  function pick(l: number | [number, number]): number {
    if (Array.isArray(l)) return l[0] + rand() * Math.max(0, l[1] - l[0]);
    return l;
  }
  const latency = () => pick(faults.latencyMs);

  const roll = (p: number) => p > 0 && rand() < p;

  /**
   * Random faults shared by both routes. Returns an answer to send, 'hang', or null to carry on.
   */
  function randomFault(): Answer | 'hang' | null {
    if (roll(faults.hangRate)) {
      stats.faults.hang += 1;
      return 'hang';
    }
    if (roll(faults.rate429)) {
      stats.faults.rate429 += 1;
      return { ...errorAnswer(429, 'Too many requests'), headers: { 'retry-after': String(faults.retryAfterSeconds) } };
    }
    if (roll(faults.errorRate)) {
      stats.faults.error += 1;
      const status = [500, 502, 503][Math.floor(rand() * 3)] ?? 500;
      if (status === 502) return { status, body: '<html><body><h1>502 Bad Gateway</h1></body></html>' };
      if (status === 503) return errorAnswer(503, { message: 'Service Unavailable' });
      return errorAnswer(500, 'internal server error');
    }
    return null;
  }

  async function applyLatency(): Promise<boolean> {
    const ms = latency();
    if (ms > 0) {
      stats.faults.latency += 1;
      await sleep(ms);
    }
    return !closed;
  }

  /** The body as text; 'too-large' past MAX_BODY_BYTES (drained, not kept); 'aborted' if the client went away. */
  function readBody(req: IncomingMessage): Promise<{ text: string } | 'too-large' | 'aborted'> {
    return new Promise((resolve) => {
      const chunks: Buffer[] = [];
      let size = 0;
      req.on('data', (c: Buffer) => {
        size += c.length;
        if (size <= MAX_BODY_BYTES) chunks.push(c);
      });
      req.on('end', () => resolve(size > MAX_BODY_BYTES ? 'too-large' : { text: Buffer.concat(chunks).toString('utf8') }));
      req.on('close', () => resolve('aborted')); // no-op when 'end' came first
      req.on('error', () => resolve('aborted'));
    });
  }

  function authorized(req: IncomingMessage): boolean {
    if (appId !== undefined && req.headers['qiscus-app-id'] !== appId) return false;
    if (secretKey !== undefined && req.headers['qiscus-secret-key'] !== secretKey) return false;
    return true;
  }

  /**
   * The two v2 lists (fixtures divisions-page.json, agents-by-division-page.json): `data` is the array, with
   * `meta {page, limit, total, total_page}`. Agents by division: one division per call (`division_ids[]`), offline
   * agents included. An outage of the agents list fails them too.
   */
  function handleDivisions(route: string, url: URL, res: ServerResponse): void {
    if (outage?.list) return send(res, route, errorAnswer(outage.status, { message: 'Service Unavailable' }));
    const page = Math.max(1, Math.floor(Number(url.searchParams.get('page') ?? 1)) || 1);
    const limit = Math.max(1, Math.floor(Number(url.searchParams.get('limit') ?? 20)) || 20);
    const paged = <T>(all: T[]) => ({
      data: all.slice((page - 1) * limit, page * limit),
      meta: { page, limit, total: all.length, total_page: Math.ceil(all.length / limit) },
    });
    if (route === DIVISIONS_ROUTE) {
      const all = [...divisionMap.entries()].sort(([x], [y]) => x - y).map(([id, name]) => ({
        app_id: 1, created_at: isoSeconds(startedAt), id, is_default_role: false, name, updated_at: isoSeconds(startedAt),
      }));
      return send(res, route, { status: 200, body: paged(all) });
    }
    const division = Number(url.searchParams.get('division_ids[]'));
    if (!divisionMap.has(division)) return send(res, route, errorAnswer(404, { message: 'division not found' }));
    const members = [...agentMap.values()].filter((a) => a.divisions.includes(division)).sort((x, y) => x.id - y.id);
    send(res, route, { status: 200, body: paged(members.map(listedAgent)) });
  }

  async function handleList(url: URL, res: ServerResponse): Promise<void> {
    listRequests.push({ at: Date.now(), page: Math.max(1, Math.floor(Number(url.searchParams.get('page') ?? 1)) || 1) });
    if (outage?.list) {
      outage.listCalls += 1;
      return send(res, LIST_ROUTE, errorAnswer(outage.status, { message: 'Service Unavailable' }));
    }
    if (faults.listLatencyMs > 0) {
      await sleep(faults.listLatencyMs);
      if (closed) return;
    }
    if (faults.faultsOnList) {
      if (!(await applyLatency())) return;
      const f = randomFault();
      if (f === 'hang') return hang(LIST_ROUTE);
      if (f) return send(res, LIST_ROUTE, f);
    }
    const page = Math.max(1, Math.floor(Number(url.searchParams.get('page') ?? 1)) || 1);
    const limit = Math.max(1, Math.floor(Number(url.searchParams.get('limit') ?? 20)) || 20);
    const all = [...agentMap.values()].sort((x, y) => x.id - y.id);
    const agents = all.slice((page - 1) * limit, page * limit).map(listedAgent);
    send(res, LIST_ROUTE, { status: 200, body: { data: { agents }, meta: { per_page: limit, total_count: all.length }, status: 200 } });
  }

  async function handleAssign(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const read = await readBody(req);
    if (read === 'aborted') return;
    const receivedAt = Date.now();
    if (read === 'too-large') return send(res, ASSIGN_ROUTE, errorAnswer(413, 'request body too large'));
    let input: unknown;
    try {
      input = JSON.parse(read.text);
    } catch {
      return send(res, ASSIGN_ROUTE, errorAnswer(400, 'invalid JSON body'));
    }
    const o = (input !== null && typeof input === 'object' ? input : {}) as Record<string, unknown>;
    const roomId = typeof o.room_id === 'number' || typeof o.room_id === 'string' ? String(o.room_id).trim() : '';
    const agentId = typeof o.agent_id === 'string' ? Number(o.agent_id) : o.agent_id;
    const maxAgent = o.max_agent === undefined || o.max_agent === null ? 1 : Number(o.max_agent);
    if (!roomId) return send(res, ASSIGN_ROUTE, errorAnswer(400, 'room_id is required'));
    if (typeof agentId !== 'number' || !Number.isInteger(agentId)) {
      return send(res, ASSIGN_ROUTE, errorAnswer(400, 'agent_id is required'));
    }
    if (!Number.isInteger(maxAgent) || maxAgent < 1) return send(res, ASSIGN_ROUTE, errorAnswer(400, 'max_agent is invalid'));

    const call = { performed: false };
    let clientGone = false;
    pending.add(call);
    res.on('close', () => {
      pending.delete(call); // answered, or the client went away
      if (!res.writableEnded) clientGone = true;
    });
    if (!(await applyLatency())) return;
    if (faults.dropIfClientGone && (clientGone || res.destroyed)) {
      droppedCalls += 1;
      return;
    }

    const log = (status: number, extra: Partial<AssignmentLogEntry> = {}): AssignmentLogEntry => {
      const entry: AssignmentLogEntry = {
        room_id: roomId,
        agent_id: agentId,
        at: Date.now(),
        status,
        session: rooms.get(roomId)?.session ?? 0,
        receivedAt,
        ...extra,
      };
      assignments.push(entry);
      return entry;
    };
    /** Sends the answer after the answer delay, noting when it went out. */
    const reply = async (entry: AssignmentLogEntry, a: Answer, delayMs = pick(faults.answerDelayMs)): Promise<void> => {
      if (delayMs > 0) {
        await sleep(delayMs);
        if (closed) return;
      }
      const written = !res.destroyed && !res.writableEnded;
      send(res, ASSIGN_ROUTE, a);
      if (written) entry.answeredAt = Date.now();
    };
    /** performAssign, telling onAssigned / resolveOnAssign when it put the agent in the room. */
    const perform = () => {
      const real = performAssign(roomId, agentId, maxAgent);
      const performed = real.status === 200 && !real.repeat;
      if (performed) {
        call.performed = true;
        afterPerform(roomId, agentId);
      }
      return { real, performed };
    };

    if (outage) {
      outage.assignCalls += 1;
      const entry = log(outage.status, { fault: 'error' });
      return reply(entry, errorAnswer(outage.status, { message: 'Service Unavailable' }));
    }

    const step = faults.script.shift();
    if (step) {
      stats.faults.script += 1;
      let real: (Answer & { repeat?: boolean }) | undefined;
      let performed = false;
      if (step.accept) ({ real, performed } = perform());
      const extra: Partial<AssignmentLogEntry> = performed ? { fault: 'script', performed } : { fault: 'script' };
      if (step.hang) {
        log(0, extra);
        return hang(ASSIGN_ROUTE);
      }
      const ok = step.status >= 200 && step.status < 300;
      const body =
        step.body !== undefined
          ? step.body
          : ok && real
            ? real.body
            : { errors: STATUS_CODES[step.status] ?? 'scripted error', status: step.status };
      const entry = log(step.status, extra);
      return reply(entry, { status: step.status, body, headers: step.headers }, step.answerDelayMs);
    }

    const f = randomFault();
    if (f === 'hang') {
      log(0, { fault: 'hang' });
      return hang(ASSIGN_ROUTE);
    }
    if (f) {
      const entry = log(f.status, { fault: f.status === 429 ? 'rate429' : 'error' });
      return reply(entry, f);
    }
    if (faults.rejectAgents.has(agentId)) {
      stats.faults.reject += 1;
      const entry = log(400, { fault: 'reject' });
      return reply(entry, errorAnswer(400, 'agent cannot be assigned'));
    }

    const { real, performed } = perform();
    const flags: Partial<AssignmentLogEntry> = performed ? { performed } : {};
    if (real.status === 200 && roll(faults.acceptThenFailRate)) {
      stats.faults.acceptThenFail += 1;
      const entry = log(500, { fault: 'acceptThenFail', ...flags });
      return reply(entry, errorAnswer(500, 'internal server error'));
    }
    const entry = log(real.status, real.repeat ? { repeat: true } : flags);
    return reply(entry, real);
  }

  /** After an assign call put `agentId` in the room: the onAssigned hook, then resolveOnAssign. */
  function afterPerform(roomId: string, agentId: number): void {
    const r = rooms.get(roomId)!;
    const a: PerformedAssignment = { roomId, agentId, serviceId: r.open!.id, session: r.session };
    sim.onAssigned?.(a);
    const auto = sim.resolveOnAssign;
    if (!auto || r.open?.id !== a.serviceId) return; // off, or the hook resolved it already
    const entry: AutoResolution = { room_id: roomId, agent_id: agentId, service_id: a.serviceId, at: Date.now(), status: 0 };
    autoResolutions.push(entry);
    const by = typeof auto === 'object' ? auto.by : undefined;
    // resolve() changes the room at once (its synchronous part); only the webhook is left to run in the background.
    resolve(roomId, by === undefined ? {} : { by }).then(
      (w) => Object.assign(entry, { status: w.status, body: w.body }),
      (e: unknown) => (entry.error = String(e)),
    );
  }

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://sim.invalid');
    const route = `${req.method} ${url.pathname.replace(/\/+$/, '')}`;
    if (![LIST_ROUTE, ASSIGN_ROUTE, DIVISIONS_ROUTE, DIVISION_AGENTS_ROUTE].includes(route)) {
      return send(res, 'other', errorAnswer(404, 'not found'));
    }
    if (!authorized(req)) return send(res, route, errorAnswer(401, { message: 'Unauthorized' }));
    if (route === LIST_ROUTE) return handleList(url, res);
    if (route === DIVISIONS_ROUTE || route === DIVISION_AGENTS_ROUTE) return handleDivisions(route, url, res);
    return handleAssign(req, res);
  }

  const server = createServer((req, res) => {
    handle(req, res).catch((e: unknown) => {
      if (!res.headersSent && !res.destroyed) send(res, 'other', errorAnswer(500, String(e)));
    });
  });

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port ?? 0, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const port = (server.address() as AddressInfo).port;
  const url = `http://${host.includes(':') ? `[${host}]` : host}:${port}`;

  // ---------- webhooks ----------

  async function postWebhook(path: 'new_request' | 'close_request', payload: unknown): Promise<WebhookResult> {
    if (!sim.webhookBaseUrl) throw new Error('simulator: webhookBaseUrl is not set');
    const target = new URL(`${sim.webhookBaseUrl.replace(/\/+$/, '')}/api/v1/${path}`);
    if (sim.webhookSecret) target.searchParams.set('secret', sim.webhookSecret);
    stats.webhooks[path] += 1;
    const res = await fetch(target, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(payload),
      signal: AbortSignal.timeout(WEBHOOK_TIMEOUT_MS),
    });
    const text = await res.text();
    let body: unknown = text;
    try {
      body = JSON.parse(text);
    } catch {
      /* not JSON: keep the text */
    }
    return { status: res.status, body };
  }

  function candidateAgent(id: number | null) {
    const a = id === null ? undefined : agentMap.get(id);
    if (!a) return null;
    return {
      id: a.id,
      name: a.name,
      email: a.email,
      authentication_token: `tok${a.id}`,
      created_at: sqlTime(startedAt),
      updated_at: sqlTime(startedAt),
      sdk_email: `${appCode}_${a.email}`,
      sdk_key: `k${a.id}`,
      is_available: a.is_available,
      type: typeNumber(a.type_as_string),
      avatar_url: null,
      app_id: 1,
      is_verified: false,
      notifications_room_id: '0',
      bubble_color: '#666666',
      qismo_key: 'sim',
      direct_login_token: null,
      type_as_string: a.type_as_string,
      assigned_rules: ['qiscus_messaging'],
    };
  }

  async function sendNewRequest(
    roomId: string,
    o: { name?: string; email?: string; source?: string; extras?: Record<string, unknown> } = {},
  ): Promise<WebhookResult> {
    const r = room(roomId);
    if (o.name !== undefined) r.customer.name = o.name;
    if (o.email !== undefined) r.customer.email = o.email;
    if (o.source !== undefined) r.source = o.source;
    if (o.extras !== undefined) r.extras = o.extras;
    // A customer writing into a room whose last service was resolved starts a new session.
    openService(r);
    const last = r.lastResolved;
    const payload = last
      ? {
          // caa-returning-customer.json: is_resolved/latest_service describe the earlier, resolved session.
          app_id: appCode,
          source: r.source,
          name: r.customer.name,
          email: r.customer.email,
          avatar_url: r.customer.avatar,
          extras: JSON.stringify(r.extras),
          is_resolved: true,
          latest_service: {
            id: last.id,
            user_id: last.resolved_by ?? 1,
            room_log_id: last.id % 100000,
            app_id: 1,
            room_id: last.room_id,
            notes: last.notes,
            resolved_at: last.resolved_at ? sqlTime(last.resolved_at) : null,
            is_resolved: true,
            created_at: sqlTime(last.created_at),
            updated_at: sqlTime(last.resolved_at ?? last.created_at),
            first_comment_id: last.first_comment_id,
            last_comment_id: last.last_comment_id,
            retrieved_at: sqlTime(last.created_at),
            first_comment_timestamp: null,
          },
          room_id: r.id,
          candidate_agent: candidateAgent(r.lastAgentId),
        }
      : {
          // caa-new-customer.json
          app_id: appCode,
          avatar_url: r.customer.avatar,
          candidate_agent: null,
          email: r.customer.email,
          extras: JSON.stringify(r.extras),
          is_new_session: true,
          is_resolved: false,
          latest_service: null,
          name: r.customer.name,
          room_id: r.id,
          source: r.source,
        };
    return postWebhook('new_request', payload);
  }

  async function resolve(roomId: string, o: { by?: number; notes?: string | null } = {}): Promise<WebhookResult> {
    const r = room(roomId);
    let s = r.open;
    if (s) {
      s.is_resolved = true;
      s.notes = o.notes ?? s.notes;
      s.last_comment_id = nextComment();
      s.resolved_at = new Date();
      r.open = null;
      r.lastResolved = s;
    } else if (r.lastResolved) {
      // Already resolved: post the same webhook again (a duplicate delivery, as Qiscus may do).
      s = r.lastResolved;
    } else {
      // Never had a service (an admin closing an unknown room): open and resolve one.
      s = openService(r);
      s.is_resolved = true;
      s.last_comment_id = nextComment();
      s.resolved_at = new Date();
      r.open = null;
      r.lastResolved = s;
    }
    const holder = [...r.agents][0];
    takeOffAgents(r);
    const byId = o.by ?? holder ?? s.resolved_by ?? undefined;
    const by = byId === undefined ? undefined : agentMap.get(byId);
    s.resolved_by = by?.id ?? byId ?? null;
    const resolvedBy = by
      ? { email: by.email, id: by.id, is_available: by.is_available, name: by.name, type: by.type_as_string }
      : { email: 'admin@example.com', id: byId ?? ADMIN_ID, is_available: true, name: 'Admin', type: 'admin' };
    return postWebhook('close_request', {
      customer: { additional_info: [], avatar: r.customer.avatar, name: r.customer.name, user_id: r.customer.email },
      resolved_by: resolvedBy,
      service: {
        first_comment_id: s.first_comment_id,
        id: s.id,
        is_resolved: true,
        last_comment_id: s.last_comment_id,
        notes: s.notes,
        room_id: s.room_id,
        source: s.source,
      },
    });
  }

  // ---------- the handle ----------

  const sim: Simulator = {
    url,
    port,
    seed,
    webhookBaseUrl: opts.webhookBaseUrl,
    webhookSecret: opts.webhookSecret,
    faults,
    setFaults(partial) {
      Object.assign(faults, partial);
    },
    clearFaults() {
      Object.assign(faults, defaultFaults());
    },
    assignments,
    stats,

    agents: () => [...agentMap.values()].sort((x, y) => x.id - y.id).map(snapshot),
    roomsOf: (agentId) => [...(agentMap.get(agentId)?.rooms ?? [])],
    agentOf: (roomId) => {
      const r = rooms.get(roomId);
      return r ? ([...r.agents][0] ?? null) : null;
    },
    maxLoadSeen: (agentId) => maxLoad.get(agentId) ?? 0,
    maxLoadSeenAll: () => maxLoadAll,
    assignCount: (roomId) => rooms.get(roomId)?.assignCount ?? 0,

    onAssigned: opts.onAssigned,
    resolveOnAssign: opts.resolveOnAssign ?? false,
    autoResolutions,
    listRequests,
    inFlight() {
      let performed = 0;
      for (const c of pending) if (c.performed) performed += 1;
      return { notPerformed: pending.size - performed, performed };
    },
    get droppedCalls() {
      return droppedCalls;
    },
    down(o = {}) {
      if (outage) return;
      outage = { since: Date.now(), status: o.status ?? 503, list: o.list ?? false, assignCalls: 0, listCalls: 0 };
    },
    up() {
      const o = outage;
      outage = null;
      if (!o) return { ms: 0, assignCalls: 0, listCalls: 0 };
      return { ms: Date.now() - o.since, assignCalls: o.assignCalls, listCalls: o.listCalls };
    },
    get outage() {
      if (!outage) return null;
      const { since, assignCalls, listCalls } = outage;
      return { since, ms: Date.now() - since, assignCalls, listCalls };
    },

    addAgent,
    addDivision(id, name) {
      divisionMap.set(id, name ?? `Division ${id}`);
    },
    removeDivision(id) {
      divisionMap.delete(id);
      for (const a of agentMap.values()) a.divisions = a.divisions.filter((d) => d !== id);
    },
    setAgentDivisions(agentId, divisionIds) {
      mustAgent(agentId).divisions = [...divisionIds];
    },
    setAgent(id, patch) {
      const a = mustAgent(id);
      for (const [k, v] of Object.entries(patch)) if (v !== undefined) (a as unknown as Record<string, unknown>)[k] = v;
    },
    removeAgent(id) {
      const a = mustAgent(id);
      for (const roomId of a.rooms) rooms.get(roomId)?.agents.delete(id);
      agentMap.delete(id);
    },
    assignByHand(roomId, agentId) {
      const a = mustAgent(agentId);
      const r = room(roomId);
      openService(r);
      if (r.agents.has(agentId)) return;
      takeOffAgents(r);
      putOnAgent(r, a);
    },

    resolve,
    sendNewRequest,

    close() {
      if (closed) return Promise.resolve();
      closed = true;
      for (const t of timers) clearTimeout(t);
      timers.clear();
      return new Promise<void>((done) => {
        server.close(() => done());
        // Ends keep-alive sockets and hanging requests alike, so close() cannot wait on a client.
        server.closeAllConnections();
      });
    },
  };
  return sim;
}
