/**
 * Liveness (d): a resolution that arrives while the room's assign call is in flight is settled by evidence, at once.
 *
 * What is proven: one agent of capacity 1 (default_max_load set to 1 before the service starts, as a DBA would)
 * and a queue of 6 rooms. For each room Qiscus performs the assignment, the room is resolved at once (the
 * Mark-as-Resolved webhook reaches us: resolved_by = the agent for odd rooms, a supervisor for even ones, service.id
 * = the service the agent was put in), and only then, 1.5 s after performing, Qiscus answers the assign call with
 * that same service id. The answer and the resolution together prove the slot is free, so the next waiting room
 * must reach the agent at once: not after a roster pull (every 30 s) or a fixed hold.
 *
 * Bound, at the shipped defaults (roster every 30 s, sweep 5 s, lease 30 s): each next room's assign call reaches
 * Qiscus within 1 s of the previous room's assign answer (earlier is fine: a resolution by the agent itself is
 * already proof). The first room within 1 s of being queued (a free slot is used within 1 s).
 * Safety: the agent never holds more than 1 room in Qiscus, no room put on an agent twice.
 */
import { expect, it } from 'vitest';
import type { AssignmentLogEntry, WebhookResult } from '../../src/simulator/qiscus-simulator.ts';
import { OBSERVE_MS, SUPERVISOR, agents, eventually, expectSafe, liveStack, queueRooms, report, withinBound } from './harness.ts';

const ROOMS = Array.from({ length: 6 }, (_, i) => `inflight-${i}`);
const GAP_MS = 1_000;
const ANSWER_DELAY_MS = 1_500;

it('a room resolved while its assign call is in flight frees the slot when the answer comes: next room within 1 s', async () => {
  const resolutions = new Map<string, { result?: WebhookResult; at?: number }>();
  const { sim } = await liveStack({
    agents: [...agents(1), SUPERVISOR],
    capacity: 1,
    sim: { faults: { answerDelayMs: ANSWER_DELAY_MS } },
  });
  sim.onAssigned = ({ roomId }) => {
    const byAgent = ROOMS.indexOf(roomId) % 2 === 0;
    const entry: { result?: WebhookResult; at?: number } = {};
    resolutions.set(roomId, entry);
    void sim.resolve(roomId, byAgent ? {} : { by: SUPERVISOR.id }).then(
      (r) => Object.assign(entry, { result: r, at: Date.now() }),
      (e: unknown) => Object.assign(entry, { result: { status: 0, body: String(e) }, at: Date.now() }),
    );
  };

  const queuedAt = Date.now();
  await queueRooms(sim, ROOMS);
  const call = (room: string): AssignmentLogEntry | undefined => sim.assignments.find((a) => a.room_id === room);
  await withinBound(`${ROOMS[0]} reaches the agent`, GAP_MS, () => call(ROOMS[0]!), queuedAt);

  const gaps: number[] = [];
  for (let i = 1; i < ROOMS.length; i++) {
    const prev = ROOMS[i - 1]!;
    const answeredAt = (await eventually(`${prev} answered`, () => call(prev)?.answeredAt, ANSWER_DELAY_MS + 5_000, 5))!;
    const res = resolutions.get(prev);
    expect(res?.result?.status, `${prev}: resolution accepted`).toBe(200);
    expect((res!.result!.body as { outcome?: string }).outcome, `${prev}: resolution applied`).toBe('resolved');
    expect(res!.at!, `${prev}: resolution reached us before the assign answer`).toBeLessThan(answeredAt);

    const room = ROOMS[i]!;
    await withinBound(
      `${room} reaches the agent after ${prev}'s assign answer`,
      GAP_MS,
      () => call(room),
      answeredAt,
      () => `no assign call for ${room} yet; the agent holds ${sim.roomsOf(1).length} room(s) in Qiscus`,
    );
    gaps.push(call(room)!.receivedAt! - answeredAt);
  }
  report(`resolved in flight: next room reached the agent ${gaps.map((g) => `${g} ms`).join(', ')} after each answer (bound 1 s)`);

  expectSafe(sim, 1);
}, 60_000 + 5 * OBSERVE_MS);
