/**
 * WEBHOOK_SECRET: Qiscus can only be given a URL, so the secret rides in the `secret` query parameter; callers
 * that can set headers may use `X-Webhook-Secret` instead. Both sides are hashed to equal-length digests first,
 * so `timingSafeEqual` compares in constant time whatever the lengths (and reveals nothing about the length).
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import type { MiddlewareHandler } from 'hono';
import { problem, type AppEnv } from './context.ts';

const digest = (s: string) => createHash('sha256').update(s, 'utf8').digest();

export function secretEquals(expected: string, given: string | undefined): boolean {
  if (given === undefined) return false;
  return timingSafeEqual(digest(expected), digest(given));
}

/**
 * Refuses (401) a request that carries no accepted secret. No-op when no secret is configured. `previous` is the
 * secret being retired during a rotation (WEBHOOK_SECRET_PREVIOUS): accepted too, until it is removed.
 */
export function requireSecret(secret: string | undefined, previous?: string): MiddlewareHandler<AppEnv> {
  if (!secret) return async (_c, next) => next();
  return async (c, next) => {
    // Evaluate every pair, so the time taken does not say which one was tried or which secret matched.
    const given = [c.req.query('secret'), c.req.header('x-webhook-secret')];
    const matches = (expected: string | undefined) => given.map((g) => expected !== undefined && secretEquals(expected, g));
    const current = matches(secret).includes(true);
    const old = matches(previous).includes(true);
    if (!current && !old) {
      return problem(c, 401, 'missing or wrong webhook secret (query parameter `secret` or header X-Webhook-Secret)');
    }
    // During a rotation: tells when Qiscus has stopped using the old URLs, so that the old secret can be dropped.
    if (!current) c.get('log').info('webhook with the previous secret (WEBHOOK_SECRET_PREVIOUS)');
    return next();
  };
}
