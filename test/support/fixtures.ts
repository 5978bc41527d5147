/** The Qiscus payload samples in test/fixtures, and builders on top of them. */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const dir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../fixtures');

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type Json = any;

export function fixture(name: string): Json {
  return JSON.parse(readFileSync(path.join(dir, name), 'utf8'));
}

/** An allocation webhook (new customer shape) for a room. */
export function newRequest(roomId: string, extra: Record<string, unknown> = {}): Json {
  return { ...fixture('caa-new-customer.json'), room_id: roomId, ...extra };
}

/** An allocation webhook of a returning customer whose last service (id `serviceId`) was resolved. */
export function returningRequest(roomId: string, serviceId: number): Json {
  const p = fixture('caa-returning-customer.json');
  return { ...p, room_id: roomId, latest_service: { ...p.latest_service, id: serviceId, room_id: roomId } };
}

/** A Mark-as-Resolved webhook for a room. */
export function resolvedRequest(roomId: string, serviceId = 115830865): Json {
  const p = fixture('mar-resolved.json');
  return { ...p, service: { ...p.service, room_id: roomId, id: serviceId } };
}
