/**
 * What the two Qiscus webhooks must look like to be served. We check only what we rely on (the room id, and the
 * fields the SQL functions read: `source`, `latest_service.id`, `service.id`) and the structure around it;
 * every other field may be absent, null, of any type, or new: Qiscus adds fields over time and documents none of
 * them as required (the captured shapes are in test/fixtures/: caa-*.json, mar-resolved.json). The SQL functions
 * receive the payload as Qiscus sent it.
 *
 * Before zod, `checkStorable` walks the whole payload for what PostgreSQL's jsonb cannot store (the NUL
 * character, lone UTF-16 surrogates) or what would blow a stack (absurd nesting): such input must be refused here
 * with a 4xx, not discovered by the database as a 500.
 */
import { z } from 'zod';

const MAX_ROOM_ID_LENGTH = 128;
/** Qiscus payloads nest 3 levels deep; 64 leaves room for any `extras` while keeping recursion shallow. */
const MAX_DEPTH = 64;

/** A rejected payload: which field (dotted path, `$` for the body itself) and what is wrong with it. */
export interface Rejection {
  field: string;
  error: string;
}

export type Parsed<T> = { ok: true; value: T } | ({ ok: false } & Rejection);

/**
 * room_id: Qiscus sends a string of digits; a number is accepted as its digits. Trimmed, 1..128 characters.
 * Written as a transform rather than a union so that the error says exactly what is wrong.
 */
const roomId = z.unknown().transform((v, ctx): string => {
  if (v === undefined || v === null) {
    ctx.addIssue({ code: 'custom', message: 'is required' });
    return z.NEVER;
  }
  if (typeof v === 'number') {
    if (Number.isSafeInteger(v) && v >= 0) return String(v);
    ctx.addIssue({ code: 'custom', message: 'must be a string, or a non-negative integer' });
    return z.NEVER;
  }
  if (typeof v !== 'string') {
    ctx.addIssue({ code: 'custom', message: `must be a string, not ${describe(v)}` });
    return z.NEVER;
  }
  const t = v.trim();
  if (t === '') ctx.addIssue({ code: 'custom', message: 'must not be empty' });
  else if (t.length > MAX_ROOM_ID_LENGTH) {
    ctx.addIssue({ code: 'custom', message: `must be at most ${MAX_ROOM_ID_LENGTH} characters` });
  }
  return t;
});

/**
 * Qiscus ids are integers. zod's int() already means a *safe* integer (|n| <= 2^53-1), which also keeps the SQL's
 * `::bigint` cast from overflowing.
 */
const qiscusId = z
  .number({ error: (i) => `must be an integer, not ${describe(i.input)}` })
  .int({ error: 'must be an integer between -(2^53-1) and 2^53-1' })
  .nullish();

const optionalText = z.string({ error: (i) => `must be a string, not ${describe(i.input)}` }).nullish();
const optionalObject = <T extends z.core.$ZodLooseShape>(shape: T) =>
  z.looseObject(shape, { error: (i) => `must be an object or null, not ${describe(i.input)}` }).nullish();

/** Custom Agent Allocation webhook (POST /api/v1/new_request). Unknown fields pass through. */
const newRequestSchema = z.looseObject({
  room_id: roomId,
  source: optionalText,
  latest_service: optionalObject({ id: qiscusId }),
  candidate_agent: optionalObject({}),
});

/** Mark-as-Resolved webhook (POST /api/v1/close_request): the room is `service.room_id`. */
const closeRequestSchema = z.looseObject({
  service: z.looseObject(
    { room_id: roomId, id: qiscusId },
    { error: (i) => (i.input === undefined ? 'is required' : `must be an object, not ${describe(i.input)}`) },
  ),
});

/** A webhook ready for SQL: the payload as received, with its room id normalised to a trimmed string. */
export interface Webhook {
  roomId: string;
  payload: Record<string, unknown>;
}

/** Validates an allocation webhook body (already JSON-parsed). */
export function parseNewRequest(body: unknown): Parsed<Webhook> {
  const pre = checkStorable(body);
  if (pre) return { ok: false, ...pre };
  const r = newRequestSchema.safeParse(body);
  if (!r.success) return { ok: false, ...firstIssue(r.error) };
  const raw = body as Record<string, unknown>;
  // Spread (not Object.assign): an own "__proto__" key of the parsed JSON stays a plain key.
  return { ok: true, value: { roomId: r.data.room_id, payload: { ...raw, room_id: r.data.room_id } } };
}

/** Validates a resolution webhook body (already JSON-parsed). */
export function parseCloseRequest(body: unknown): Parsed<Webhook> {
  const pre = checkStorable(body);
  if (pre) return { ok: false, ...pre };
  const r = closeRequestSchema.safeParse(body);
  if (!r.success) return { ok: false, ...firstIssue(r.error) };
  const raw = body as Record<string, unknown>;
  const service = raw.service as Record<string, unknown>;
  const roomId = r.data.service.room_id;
  return { ok: true, value: { roomId, payload: { ...raw, service: { ...service, room_id: roomId } } } };
}

function firstIssue(err: z.ZodError): Rejection {
  const issue = err.issues[0]!;
  const field = issue.path.length ? issue.path.map(String).join('.') : '$';
  return { field, error: `${field} ${issue.message}` };
}

const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

/**
 * The body must be a JSON object whose every key and string PostgreSQL can store in jsonb (no U+0000, no lone
 * surrogate, which `JSON.parse` accepts from `\u` escapes), nested at most MAX_DEPTH deep. Iterative, so no input
 * can overflow the stack here. Returns the first problem, or null.
 */
function checkStorable(body: unknown): Rejection | null {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) {
    return { field: '$', error: `the body must be a JSON object, not ${describe(body)}` };
  }
  const stack: Array<{ v: unknown; path: string; depth: number }> = [{ v: body, path: '', depth: 1 }];
  while (stack.length) {
    const { v, path, depth } = stack.pop()!;
    if (typeof v === 'string') {
      const bad = badText(v);
      if (bad) return { field: path, error: `${path} ${bad}` };
      continue;
    }
    if (typeof v !== 'object' || v === null) continue;
    if (depth > MAX_DEPTH) return { field: path, error: `${path} is nested deeper than ${MAX_DEPTH} levels` };
    const entries: Array<[string, unknown]> = Array.isArray(v)
      ? v.map((x, i) => [String(i), x])
      : Object.entries(v as Record<string, unknown>);
    for (const [k, x] of entries) {
      const p = path ? `${path}.${k}` : k;
      if (!Array.isArray(v)) {
        const bad = badText(k);
        if (bad) return { field: path || '$', error: `a key in ${path || 'the body'} ${bad}` };
      }
      stack.push({ v: x, path: p, depth: depth + 1 });
    }
  }
  return null;
}

function badText(s: string): string | null {
  if (s.includes('\u0000')) return 'must not contain the NUL character (\\u0000)';
  if (LONE_SURROGATE.test(s)) return 'must not contain an unpaired UTF-16 surrogate';
  return null;
}

function describe(v: unknown): string {
  if (v === undefined) return 'missing';
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  return typeof v === 'object' ? 'an object' : `a ${typeof v}`;
}
