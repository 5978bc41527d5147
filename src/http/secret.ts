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

/** Refuses (401) a request that carries neither matching secret. No-op when no secret is configured. */
export function requireSecret(secret: string | undefined): MiddlewareHandler<AppEnv> {
  if (!secret) return async (_c, next) => next();
  const expected = secret;
  return async (c, next) => {
    // Evaluate both, so the time taken does not say which one was tried.
    const byQuery = secretEquals(expected, c.req.query('secret'));
    const byHeader = secretEquals(expected, c.req.header('x-webhook-secret'));
    if (!byQuery && !byHeader) {
      return problem(c, 401, 'missing or wrong webhook secret (query parameter `secret` or header X-Webhook-Secret)');
    }
    return next();
  };
}
