/**
 * Reads a webhook body as JSON, refusing what is not: a content type other than JSON (415), more than
 * MAX_BODY_BYTES (413, counted while streaming, so a missing or chunked Content-Length does not help), bytes that
 * are not UTF-8, an empty body or malformed JSON (400). Sets `body` for the route. Reading never throws: a client
 * that hangs up mid-body gets a 400 nobody will read.
 *
 * Content types accepted, case-insensitively and with any parameters (`charset=...` is ignored: JSON is UTF-8 by
 * RFC 8259): `application/json` and the structured-syntax suffix `application/<anything>+json`.
 */
import type { MiddlewareHandler } from 'hono';
import { bodyLimit } from 'hono/body-limit';
import { problem, type AppContext, type AppEnv } from './context.ts';

export const MAX_BODY_BYTES = 256 * 1024;

const JSON_TYPE = /^application\/(?:json|[a-z0-9!#$&^_.+-]+\+json)$/;

function isJsonContentType(header: string | undefined): boolean {
  if (!header) return false;
  const media = header.split(';', 1)[0]!.trim().toLowerCase();
  return JSON_TYPE.test(media);
}

export function jsonBody(maxBytes = MAX_BODY_BYTES): MiddlewareHandler<AppEnv> {
  const limit = bodyLimit({
    maxSize: maxBytes,
    // Connection: close, so the rest of an oversize upload is not read just to keep the connection alive (and
    // the client sees the 413 rather than a reset while it is still sending).
    onError: (c) =>
      problem(c as unknown as AppContext, 413, `the body is larger than ${maxBytes} bytes`, undefined, {
        Connection: 'close',
      }),
  });

  return async (c, next) => {
    const type = c.req.header('content-type');
    if (!isJsonContentType(type)) {
      return problem(
        c,
        415,
        type ? `content type ${JSON.stringify(type.slice(0, 100))} is not JSON; send application/json`
          : 'the Content-Type header is missing; send application/json',
      );
    }

    let bytes: Uint8Array | undefined;
    // With a Content-Length (and no Transfer-Encoding) Node's parser delivers exactly that many bytes: check the
    // number and read through @hono/node-server's direct path. Touching c.req.raw.body (as bodyLimit does) would
    // build a WHATWG Request and ReadableStream per webhook, most of this route's CPU.
    const declared = c.req.header('content-length');
    if (declared !== undefined && /^\d+$/.test(declared) && c.req.header('transfer-encoding') === undefined) {
      if (Number(declared) > maxBytes) {
        return problem(c, 413, `the body is larger than ${maxBytes} bytes`, undefined, { Connection: 'close' });
      }
      try {
        bytes = new Uint8Array(await c.req.arrayBuffer());
      } catch {
        return problem(c, 400, 'the request body could not be read');
      }
    } else {
      let refused: Response | void;
      try {
        refused = await limit(c, async () => {
          bytes = new Uint8Array(await c.req.arrayBuffer());
        });
      } catch {
        return problem(c, 400, 'the request body could not be read');
      }
      if (refused instanceof Response) return refused;
    }

    let text: string;
    try {
      text = new TextDecoder('utf-8', { fatal: true }).decode(bytes ?? new Uint8Array(0));
    } catch {
      return problem(c, 400, 'the body is not valid UTF-8');
    }
    if (text.trim() === '') return problem(c, 400, 'the body is empty; send a JSON object');
    try {
      c.set('body', JSON.parse(text));
    } catch (err) {
      return problem(c, 400, `malformed JSON: ${(err as Error).message.slice(0, 200)}`);
    }
    return next();
  };
}
