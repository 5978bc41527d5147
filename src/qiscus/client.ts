import http from 'node:http';
import https from 'node:https';
import { got, RequestError, type Response } from 'got';
import type { z } from 'zod';
import { QiscusError, kindForStatus, messageFromBody, parseRetryAfter } from './errors.ts';
import {
  AgentsByDivisionPageSchema,
  AgentsPageSchema,
  AssignAgentResponseSchema,
  DivisionsPageSchema,
  type QiscusAgent,
  type QiscusDivision,
} from './schemas.ts';

export type { QiscusAgent, QiscusDivision } from './schemas.ts';
export { QiscusError, isQiscusError, type QiscusErrorKind } from './errors.ts';

export interface QiscusClientOptions {
  baseUrl: string;
  appId: string;
  secretKey: string;
  /** Time allowed to open the TCP connection. Default 3000 ms. */
  connectTimeoutMs?: number;
  /** Time allowed between sending the request and receiving the answer's headers. Default 10000 ms. */
  responseTimeoutMs?: number;
  /** Connections kept open to Qiscus: the listener's pipeline (calls in flight) plus the roster pull. Default 16. */
  maxSockets?: number;
}

export interface AssignResult {
  /** Qiscus's service (session) id for the room, when the answer carried one. */
  serviceId: number | null;
  agentId: number;
}

export interface QiscusClient {
  listAgentsPage(page: number, limit: number): Promise<{ agents: QiscusAgent[]; totalCount: number }>;
  listAllAgents(limit?: number): Promise<QiscusAgent[]>;
  /** Every division (all pages). */
  listAllDivisions(limit?: number): Promise<QiscusDivision[]>;
  /** The ids of every agent in one division (all pages; offline agents included). */
  listDivisionAgentIds(divisionId: number, limit?: number): Promise<number[]>;
  assignAgent(roomId: string, agentId: number): Promise<AssignResult>;
}

/** Errors of a connection reset under a request (see call()). */
const RESET_CODES = new Set(['ECONNRESET', 'EPIPE']);

/** Pages of the agents list asked for at once (see listAllAgents). */
const PAGE_CONCURRENCY = 4;

export function createQiscusClient(opts: QiscusClientOptions): QiscusClient {
  const connect = opts.connectTimeoutMs ?? 3000;
  const response = opts.responseTimeoutMs ?? 10000;
  // Fail at construction rather than on the first call with an obscure got error.
  const base = new URL(opts.baseUrl);
  const baseHref = base.href.replace(/\/+$/, '');

  // Keep-alive connections, as many as calls in flight: no TCP (or TLS) handshake per call.
  const agentOptions = { keepAlive: true, maxSockets: opts.maxSockets ?? 16 };
  const agent = { http: new http.Agent(agentOptions), https: new https.Agent(agentOptions) };

  const client = got.extend({
    agent,
    headers: { 'Qiscus-App-Id': opts.appId, 'Qiscus-Secret-Key': opts.secretKey, accept: 'application/json' },
    // Retries are decided in SQL (attempt counts, backoff, queue order); a hidden retry here would double them.
    // The one exception, a connection reset before any answer, is in call().
    retry: { limit: 0 },
    // Non-2xx answers come back as responses so we can classify them and read Qiscus's message.
    throwHttpErrors: false,
    // `request` bounds the whole exchange, body included, so nothing can hang forever.
    timeout: { connect, response, request: connect + response },
    followRedirect: false,
  });

  async function call<S extends z.ZodType>(
    op: string,
    send: () => Promise<Response<string>>,
    schema: S,
  ): Promise<z.output<S>> {
    let res: Response<string>;
    try {
      res = await send().catch((e: unknown) => {
        // A connection reset before any answer is, nearly always, a kept-alive connection the server (or a proxy)
        // closed as we reused it: the request never got there. Sent again at once, once, on a new connection, as
        // HTTP clients do. Otherwise the room would wait out a backoff holding its agent's slot (the call "may have
        // landed"), and every room only that agent may serve with it. If it did land, this is the same call to the
        // same agent, which Qiscus treats as a repeat (the design's retry after an ambiguous failure is the same).
        if (e instanceof RequestError && RESET_CODES.has(e.code) && e.response === undefined) return send();
        throw e;
      });
    } catch (e) {
      // No HTTP answer at all: timeouts, refused/reset connections, DNS. All worth another try later.
      const code = e instanceof RequestError ? e.code : undefined;
      const msg = e instanceof Error ? e.message : String(e);
      throw new QiscusError({ kind: 'transient', message: `${op}: ${msg}`, code, cause: e });
    }

    const status = res.statusCode;
    if (status < 200 || status >= 300) {
      const kind = kindForStatus(status);
      throw new QiscusError({
        kind,
        status,
        message: messageFromBody(res.body ?? '', status, res.statusMessage),
        retryAfterSeconds: kind === 'transient' ? parseRetryAfter(res.headers['retry-after']) : undefined,
      });
    }

    // A 2xx we cannot read is treated as transient: a proxy or a Qiscus hiccup, not a verdict on the room.
    let json: unknown;
    try {
      json = JSON.parse(res.body);
    } catch {
      throw new QiscusError({ kind: 'transient', status, message: `${op}: answer is not JSON: ${res.body.slice(0, 200)}` });
    }
    const parsed = schema.safeParse(json);
    if (!parsed.success) {
      const issue = parsed.error.issues[0];
      const where = issue ? `${issue.path.join('.') || '(root)'}: ${issue.message}` : 'invalid';
      throw new QiscusError({ kind: 'transient', status, message: `${op}: unexpected answer shape (${where})` });
    }
    return parsed.data;
  }

  async function listAgentsPage(page: number, limit: number) {
    const body = await call(
      'list agents',
      () => client.get(`${baseHref}/api/v2/admin/agents`, { searchParams: { page, limit } }),
      AgentsPageSchema,
    );
    return { agents: body.data.agents, totalCount: body.meta.total_count };
  }

  async function listAllAgents(limit = 100): Promise<QiscusAgent[]> {
    if (!Number.isInteger(limit) || limit < 1) throw new RangeError(`limit must be a positive integer, got ${limit}`);
    const first = await listAgentsPage(1, limit);
    const pages = [first.agents];
    let total = first.totalCount;
    if (first.agents.length >= limit && first.agents.length < total) {
      // The pages total_count promises, PAGE_CONCURRENCY at a time: a roster of 10,000 agents is 100 pages, and one
      // after the other they took most of a listener's start (and of every evidence pull). A short page ends the
      // list: the pages after it are not asked for.
      const promised = Math.ceil(total / limit);
      let next = 2;
      let end = promised;
      const worker = async () => {
        for (let page = next++; page <= end; page = next++) {
          const r = await listAgentsPage(page, limit);
          pages[page - 1] = r.agents;
          total = Math.max(total, r.totalCount);
          if (r.agents.length < limit) end = Math.min(end, page);
        }
      };
      await Promise.all(Array.from({ length: Math.min(PAGE_CONCURRENCY, promised - 1) }, worker));
      // One extra page beyond what total_count promised tolerates a roster that grew while paging, and bounds the
      // list if Qiscus ever ignores `page` and keeps answering full pages.
      if (end === promised && pages[promised - 1]?.length === limit && new Set(pages.flat().map((a) => a.id)).size < total) {
        pages.push((await listAgentsPage(promised + 1, limit)).agents);
      }
    }
    // Keyed by id: if the roster shifts between pages, an agent may show up twice; keep the view of the later page.
    const byId = new Map<number, QiscusAgent>();
    for (const a of pages.flat()) byId.set(a.id, a);
    return [...byId.values()];
  }

  /**
   * All pages of a v2 list (`data[]`, `meta.total_page`). Bounded by what total_page promised plus one, in case
   * the list grew while paging or Qiscus ignores `page`.
   */
  async function allPages<T>(fetchPage: (page: number) => Promise<{ items: T[]; totalPages: number | null }>, limit: number): Promise<T[]> {
    const out: T[] = [];
    let last = 1;
    for (let page = 1; page <= last; page++) {
      const { items, totalPages } = await fetchPage(page);
      out.push(...items);
      last = Math.max(1, totalPages ?? 1) + 1;
      if (items.length < limit || (totalPages !== null && page >= totalPages)) break;
    }
    return out;
  }

  async function listAllDivisions(limit = 100): Promise<QiscusDivision[]> {
    const divisions = await allPages(async (page) => {
      const body = await call(
        'list divisions',
        () => client.get(`${baseHref}/api/v2/divisions`, { searchParams: { page, limit } }),
        DivisionsPageSchema,
      );
      return { items: body.data, totalPages: body.meta.total_page ?? null };
    }, limit);
    return [...new Map(divisions.map((d) => [d.id, d])).values()];
  }

  async function listDivisionAgentIds(divisionId: number, limit = 100): Promise<number[]> {
    const agents = await allPages(async (page) => {
      const body = await call(
        'list agents by division',
        () =>
          client.get(`${baseHref}/api/v2/admin/agents/by_division`, {
            searchParams: new URLSearchParams({ 'division_ids[]': String(divisionId), page: String(page), limit: String(limit) }),
          }),
        AgentsByDivisionPageSchema,
      );
      return { items: body.data.map((a) => a.id), totalPages: body.meta.total_page ?? null };
    }, limit);
    return [...new Set(agents)];
  }

  async function assignAgent(roomId: string, agentId: number): Promise<AssignResult> {
    const body = await call(
      'assign agent',
      () =>
        client.post(`${baseHref}/api/v1/admin/service/assign_agent`, {
          json: { room_id: roomId, agent_id: agentId, max_agent: 1 },
        }),
      AssignAgentResponseSchema,
    );
    return { serviceId: body.data.service?.id ?? null, agentId: body.data.added_agent?.id ?? agentId };
  }

  return { listAgentsPage, listAllAgents, listAllDivisions, listDivisionAgentIds, assignAgent };
}
