/**
 * Liveness (e): uncertainty is settled by evidence. A truly ambiguous call is settled by the first roster pull that
 * started after it ended, neither sooner nor later.
 *
 * What is proven: one agent of capacity 1 (default_max_load set to 1 before the service starts, as a DBA would),
 * rooms A and B queued. Qiscus performs A's assignment, a supervisor resolves A meanwhile (the webhook reaches us:
 * resolved_by = the supervisor, not our agent), and then Qiscus answers A's call 500, with no service id. Nothing
 * ties that resolution to our call, so the slot must count as taken (safe side) until a roster pull that started
 * after the call ended shows the agent's current_customer_count (0), and then free at once.
 *
 * Bounds: AGENT_SYNC_SECONDS=2 here, because the roster period is what this test is about (everything else at the
 * shipped defaults). B's assign call reaches Qiscus
 *   - not before the first agents-list request that arrived after A's 500 was sent (safety), and
 *   - within one roster period + 1 s (3 s) of A's 500 (liveness).
 * Safety: the agent never holds more than 1 room in Qiscus, no room put on an agent twice.
 */
import { expect, it } from 'vitest';
import type { WebhookResult } from '../../src/simulator/qiscus-simulator.ts';
import { OBSERVE_MS, SUPERVISOR, agents, eventually, expectSafe, liveStack, queueRooms, report, withinBound } from './harness.ts';

const SYNC_S = 2;
const BOUND_MS = SYNC_S * 1000 + 1_000;

it('an assign call that landed, answered 500, its room resolved by a supervisor meanwhile: slot freed by the next pull', async () => {
  let resolution: { result?: WebhookResult; at?: number } | undefined;
  const { sim } = await liveStack({
    agents: [...agents(1), SUPERVISOR],
    capacity: 1,
    env: { AGENT_SYNC_SECONDS: String(SYNC_S) },
  });
  // A's call: performed, then (1 s later, the resolution having reached us) answered 500 without a service id.
  sim.setFaults({ script: [{ status: 500, accept: true, answerDelayMs: 1_000, body: { errors: 'internal server error' } }] });
  sim.onAssigned = ({ roomId }) => {
    if (roomId !== 'ambiguous-A') return;
    resolution = {};
    void sim.resolve(roomId, { by: SUPERVISOR.id }).then(
      (r) => Object.assign(resolution!, { result: r, at: Date.now() }),
      (e: unknown) => Object.assign(resolution!, { result: { status: 0, body: String(e) }, at: Date.now() }),
    );
  };
  await queueRooms(sim, ['ambiguous-A', 'ambiguous-B']);

  const callA = () => sim.assignments.find((a) => a.room_id === 'ambiguous-A');
  const endedAt = (await eventually('A answered 500', () => callA()?.answeredAt, 10_000, 5))!;
  expect(callA()!.status).toBe(500);
  expect(resolution?.result?.status, 'resolution accepted').toBe(200);
  expect((resolution!.result!.body as { outcome?: string }).outcome, 'resolution applied').toBe('resolved');
  expect(resolution!.at!, 'resolution reached us while the call was in flight').toBeLessThan(endedAt);

  const callB = () => sim.assignments.find((a) => a.room_id === 'ambiguous-B');
  const took = await withinBound(
    'B reaches the agent after A’s ambiguous call',
    BOUND_MS,
    () => callB(),
    endedAt,
    () => `no assign call for B; agent 1 holds ${sim.roomsOf(1).length} room(s) in Qiscus; ` +
      `${sim.listRequests.filter((l) => l.at >= endedAt).length} roster requests since A's 500`,
  );
  const bAt = callB()!.receivedAt!;
  const pull = sim.listRequests.find((l) => l.at >= endedAt && l.page === 1);
  report(
    `ambiguous call: B reached the agent ${took} ms after A's 500 (bound ${BOUND_MS} ms); first roster pull after ` +
      `the 500 at +${pull ? pull.at - endedAt : '?'} ms`,
  );
  expect(pull, 'a roster pull started after A’s call ended').toBeDefined();
  expect(pull!.at, 'B was not assigned before that pull (the slot stayed taken until the evidence was in)').toBeLessThanOrEqual(bAt);

  expectSafe(sim, 1);
}, 60_000 + OBSERVE_MS);
