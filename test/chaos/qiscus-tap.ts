/**
 * A pass-through HTTP proxy between the listeners and the Qiscus simulator that records every assign_agent call as
 * the listener made it: when it started (the moment an assignment "starts", for the liveness check), for which room
 * and agent, and how it ended for the listener (the answer's status, or the listener went away: its timeout, or
 * kill -9). The simulator's own log (`sim.assignments`) only has calls once it has decided them (after its
 * latency); the tap also knows the calls still on their way, so the chaos run can tell an agent whose slot a call
 * in flight may take from an agent who is idle.
 *
 * It forwards everything unchanged (the roster pull too) and adds well under a millisecond on loopback. When the
 * listener goes away, the request to the simulator is cut too: the simulator still decides it (it does not notice,
 * as a real server may not), so Qiscus may perform a call whose listener is gone, as it would.
 */
import { createServer, request, Agent, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

export interface TapCall {
  /** Sequence number (order of arrival). */
  n: number;
  room: string;
  agent: number;
  /** Date.now() when the request reached the tap. */
  start: number;
  /** Date.now() when the listener had the whole answer, or went away. */
  end?: number;
  /** The answer's status; 0 when the listener went away first (timeout, killed) or the simulator was unreachable. */
  status?: number;
  /** The listener went away before its answer (its timeout, or the process died). */
  clientGone?: boolean;
  /** The simulator could not be reached at all (the call never got to Qiscus). */
  upstreamError?: boolean;
  /** Set by the caller: the driver's session of the room when the call started. */
  session?: number;
}

export interface QiscusTap {
  url: string;
  readonly calls: TapCall[];
  /** Date.now() of each roster pull (agents list request) the listeners made. */
  readonly pulls: number[];
  /** Called synchronously as each assign call arrives, before it is forwarded. */
  onCall?: (c: TapCall) => void;
  /** Called when a call ends (answer delivered, listener gone, or simulator unreachable). */
  onEnd?: (c: TapCall) => void;
  /** Called synchronously as a roster pull (the agents list) arrives, before it is forwarded. */
  onPull?: (at: number) => void;
  close(): Promise<void>;
}

const ASSIGN_PATH = '/api/v1/admin/service/assign_agent';

export async function startQiscusTap(target: string): Promise<QiscusTap> {
  const up = new URL(target);
  const agent = new Agent({ keepAlive: true, maxSockets: Infinity });
  const calls: TapCall[] = [];
  const pulls: number[] = [];
  const tap: QiscusTap = { url: '', calls, pulls, close: async () => {} };

  const finish = (c: TapCall | undefined, how: Partial<TapCall>) => {
    if (!c || c.end !== undefined) return;
    Object.assign(c, how, { end: Date.now() });
    tap.onEnd?.(c);
  };

  const server = createServer((req: IncomingMessage, res: ServerResponse) => {
    const chunks: Buffer[] = [];
    req.on('data', (b: Buffer) => chunks.push(b));
    req.on('error', () => {});
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      let call: TapCall | undefined;
      if (req.method === 'GET' && (req.url ?? '').split('?')[0] === '/api/v2/admin/agents') {
        pulls.push(Date.now());
        tap.onPull?.(Date.now());
      }
      if (req.method === 'POST' && (req.url ?? '').split('?')[0]!.replace(/\/+$/, '') === ASSIGN_PATH) {
        try {
          const o = JSON.parse(body.toString('utf8')) as { room_id?: unknown; agent_id?: unknown };
          call = { n: calls.length, room: String(o.room_id), agent: Number(o.agent_id), start: Date.now() };
          calls.push(call);
          tap.onCall?.(call);
        } catch {
          // not ours to judge: the simulator answers it
        }
      }
      let out: ReturnType<typeof request>;
      let gone = false;
      const forward = (retry: boolean) => {
        out = request(
          {
            host: up.hostname,
            port: up.port,
            method: req.method,
            path: req.url,
            headers: { ...req.headers, host: up.host },
            agent,
          },
          (answer) => {
            res.writeHead(answer.statusCode ?? 502, answer.headers);
            answer.pipe(res);
            answer.on('end', () => finish(call, { status: answer.statusCode ?? 0 }));
            answer.on('error', () => finish(call, { status: 0, clientGone: true }));
          },
        );
        const sent = out;
        sent.on('error', (e: NodeJS.ErrnoException) => {
          // A kept-alive socket the simulator had just closed: the request never reached it, send it again once.
          if (retry && !gone && sent.reusedSocket && e.code === 'ECONNRESET' && !res.destroyed) return forward(false);
          if (!res.headersSent && !res.destroyed) {
            finish(call, { status: 0, upstreamError: true });
            res.writeHead(502, { 'content-type': 'application/json' });
            res.end(JSON.stringify({ errors: 'tap: simulator unreachable' }));
          }
        });
        sent.end(body);
      };
      forward(true);
      // The listener went away (its timeout, or kill -9) before the answer: cut the forwarded call too.
      res.on('close', () => {
        if (!res.writableFinished) {
          gone = true;
          finish(call, { status: 0, clientGone: true });
          out.destroy();
        }
      });
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  tap.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  tap.close = () =>
    new Promise<void>((resolve) => {
      agent.destroy();
      server.close(() => resolve());
      server.closeAllConnections();
    });
  return tap;
}
