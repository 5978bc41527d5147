/**
 * Every environment variable, parsed once with zod. A missing or malformed value stops the process at start with
 * one line naming the variable (see `exitOnConfigError`).
 */
import { z } from 'zod';

const port = (fallback: number) =>
  z.coerce.number().int().min(0).max(65535).default(fallback);
const positive = (fallback: number) => z.coerce.number().int().positive().default(fallback);
const url = z.string().trim().url().refine((u) => /^https?:\/\//.test(u), 'must be an http(s) URL');
const pgUrl = z
  .string()
  .trim()
  .refine((u) => /^postgres(ql)?:\/\//.test(u), 'must be a postgres:// connection string');
const nonEmpty = z.string().trim().min(1, 'must not be empty');
const optionalText = z
  .string()
  .optional()
  .transform((v) => (v === undefined || v.trim() === '' ? undefined : v));

/** Qiscus calls in flight per listener. Each refill of the pipeline reserves its free places in one statement, so
 * a deeper one also costs PostgreSQL less per room (README, cold drain: 8 → 16 took it from 0.77× to 0.99×
 * graphile-worker's rate, 16 → 32 from 0.99× to 1.11-1.16×, PostgreSQL CPU per room 0.35 → 0.26 ms). Exported for the
 * benchmarks and the chaos watch, which must use the shipped value. */
export const DEFAULT_LISTENER_CONCURRENCY = 32;

const shape = {
  DATABASE_URL: pgUrl.optional(),
  PORT: port(8080),
  QISCUS_BASE_URL: url.default('https://omnichannel.qiscus.com'),
  QISCUS_APP_ID: nonEmpty.optional(),
  QISCUS_SECRET_KEY: nonEmpty.optional(),
  WEBHOOK_SECRET: optionalText,
  AGENT_SYNC_SECONDS: positive(30),
  LOG_LEVEL: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
  DASHBOARD_TOKEN: optionalText, // unset: no dashboard at all (GET /dashboard is a 404)
  // From here on, settings of ours beyond the product's required environment above; the README documents all.
  METRICS_PORT: port(9464),
  LISTENER_CONCURRENCY: positive(DEFAULT_LISTENER_CONCURRENCY),
  SWEEP_SECONDS: z.coerce.number().min(0).default(5), // 0 turns the periodic sweep off (tests of NOTIFY)
  QISCUS_TIMEOUT_MS: positive(10_000),
  DATA_DIR: z.string().default('.data/postgres'),
  EMBEDDED_PG_PORT: port(54329),
  PUBLIC_URL: url.optional(),
  // During a rotation of WEBHOOK_SECRET: the old one, still accepted until Qiscus has the new URLs (README).
  WEBHOOK_SECRET_PREVIOUS: optionalText,
};

const schema = z.object(shape);
export type Config = z.infer<typeof schema>;

/** What each entry point cannot run without. */
export type Role = 'web' | 'listener' | 'start' | 'migrate';
const required: Record<Role, Array<keyof Config>> = {
  web: ['DATABASE_URL'],
  listener: ['DATABASE_URL', 'QISCUS_APP_ID', 'QISCUS_SECRET_KEY'],
  migrate: ['DATABASE_URL'],
  start: ['QISCUS_APP_ID', 'QISCUS_SECRET_KEY'], // no DATABASE_URL: an embedded PostgreSQL in DATA_DIR
};

const hints: Partial<Record<keyof Config, string>> = {
  DATABASE_URL: 'the PostgreSQL connection string, e.g. postgres://user:pass@localhost:5432/allocator',
  QISCUS_APP_ID: 'your Qiscus Omnichannel App ID (Settings → App Information)',
  QISCUS_SECRET_KEY: 'your Qiscus Omnichannel Secret Key (Settings → App Information)',
};

export class ConfigError extends Error {}

/** Parses the environment for one role; throws ConfigError with a one-line message on the first problem. */
export function loadConfig(role: Role, env: NodeJS.ProcessEnv = process.env): Config {
  // An empty variable means "not set" (docker-compose passes `FOO=` for unset values).
  const raw = Object.fromEntries(
    Object.keys(shape).map((k) => [k, env[k] === '' ? undefined : env[k]]),
  );
  const parsed = schema.safeParse(raw);
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    const name = String(issue.path[0]);
    throw new ConfigError(`${name} is invalid: ${issue.message} (got ${JSON.stringify(env[name])})`);
  }
  for (const name of required[role]) {
    if (parsed.data[name] === undefined) {
      throw new ConfigError(`${name} is required${hints[name] ? `: ${hints[name]}` : ''}`);
    }
  }
  // An old secret alone would turn the check on with only the secret being retired (`npm start` is spared: it
  // generates the current one when none is set).
  if (parsed.data.WEBHOOK_SECRET_PREVIOUS !== undefined && parsed.data.WEBHOOK_SECRET === undefined && role !== 'start') {
    throw new ConfigError('WEBHOOK_SECRET_PREVIOUS is set but WEBHOOK_SECRET is not: set the new secret too');
  }
  return parsed.data;
}

/** For entry points: the config, or one clear line on stderr and exit code 2. */
export function loadConfigOrExit(role: Role, env: NodeJS.ProcessEnv = process.env): Config {
  try {
    return loadConfig(role, env);
  } catch (e) {
    if (e instanceof ConfigError) {
      process.stderr.write(`configuration error: ${e.message}\n`);
      process.exit(2);
    }
    throw e;
  }
}
