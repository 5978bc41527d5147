/**
 * Qiscus call latency and errors, as a decorator around the QiscusClient (the client itself knows nothing of
 * metrics). Labels: `operation` (assign_agent, list_agents) and `status`: the HTTP status of a failure, the
 * connection error code when there was no answer (ETIMEDOUT, ECONNREFUSED, ...), `bad_answer` for a 2xx we could
 * not read, and `2xx` for a success.
 */
import { Counter, Histogram, type Registry } from 'prom-client';
import { LATENCY_BUCKETS, PREFIX } from '../metrics/registry.ts';
import { isQiscusError, type QiscusClient } from './client.ts';

type QiscusOperation = 'assign_agent' | 'list_agents' | 'list_divisions' | 'list_division_agents';

/** The status label of a failed call. */
function statusLabel(e: unknown): string {
  if (!isQiscusError(e)) return 'error';
  if (e.status !== undefined) return e.status >= 200 && e.status < 300 ? 'bad_answer' : String(e.status);
  return e.code ?? 'no_answer';
}

export interface QiscusMetrics {
  instrument(client: QiscusClient): QiscusClient;
}

export function createQiscusMetrics(registry: Registry): QiscusMetrics {
  const duration = new Histogram({
    name: `${PREFIX}qiscus_request_duration_seconds`,
    help: 'Qiscus API calls by operation and status (HTTP status, error code, or 2xx); list_agents is one roster pull, all pages',
    labelNames: ['operation', 'status'] as const,
    buckets: LATENCY_BUCKETS,
    registers: [registry],
  });
  const errors = new Counter({
    name: `${PREFIX}qiscus_errors_total`,
    help: 'Failed Qiscus API calls by operation, status and kind (transient: retried; rejected: refused for this room/agent; config: bad credentials)',
    labelNames: ['operation', 'status', 'kind'] as const,
    registers: [registry],
  });

  async function timed<T>(operation: QiscusOperation, call: () => Promise<T>): Promise<T> {
    const t0 = performance.now();
    try {
      const result = await call();
      duration.observe({ operation, status: '2xx' }, (performance.now() - t0) / 1000);
      return result;
    } catch (e) {
      const status = statusLabel(e);
      duration.observe({ operation, status }, (performance.now() - t0) / 1000);
      errors.inc({ operation, status, kind: isQiscusError(e) ? e.kind : 'bug' });
      throw e;
    }
  }

  return {
    instrument(client) {
      return {
        assignAgent: (roomId, agentId) => timed('assign_agent', () => client.assignAgent(roomId, agentId)),
        listAgentsPage: (page, limit) => timed('list_agents', () => client.listAgentsPage(page, limit)),
        // The client pages internally; measured as one pull (nearly always one page of up to 100 agents).
        listAllAgents: (limit) => timed('list_agents', () => client.listAllAgents(limit)),
        listAllDivisions: (limit) => timed('list_divisions', () => client.listAllDivisions(limit)),
        listDivisionAgentIds: (id, limit) => timed('list_division_agents', () => client.listDivisionAgentIds(id, limit)),
      };
    },
  };
}
