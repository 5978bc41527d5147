import { z } from 'zod';

/*
 * Only the fields we use are declared; zod drops the rest, so new or unknown Qiscus fields never break parsing.
 * Fields that Qiscus may plausibly send as null or leave out get a safe default instead of failing a whole
 * roster page: an agent with an unknown availability is treated as offline.
 */

const boolOr = (fallback: boolean) =>
  z
    .boolean()
    .nullish()
    .transform((v) => v ?? fallback);

const QiscusAgentSchema = z.object({
  id: z.number().int(),
  name: z
    .string()
    .nullish()
    .transform((v) => v ?? ''),
  email: z
    .string()
    .nullish()
    .transform((v) => v ?? null),
  is_available: boolOr(false),
  force_offline: boolOr(false),
  current_customer_count: z
    .number()
    .int()
    .nonnegative()
    .nullish()
    .transform((v) => v ?? 0),
  // Only "agent" serves rooms; a missing type therefore means "does not serve".
  type_as_string: z
    .string()
    .nullish()
    .transform((v) => v ?? ''),
});
export type QiscusAgent = z.output<typeof QiscusAgentSchema>;

/** `GET /api/v2/admin/agents` (sample: test/fixtures/agents-page.json). */
export const AgentsPageSchema = z.object({
  data: z.object({
    agents: z
      .array(QiscusAgentSchema)
      .nullish()
      .transform((v) => v ?? []),
  }),
  meta: z.object({
    total_count: z.number().int().nonnegative(),
    per_page: z.number().int().nullish(),
  }),
});

/** `meta` of the v2 pages that list `data[]` directly (divisions, agents by division). */
const PageMetaSchema = z.object({
  page: z.number().int().nullish(),
  limit: z.number().int().nullish(),
  total: z.number().int().nonnegative().nullish(),
  total_page: z.number().int().nonnegative().nullish(),
});

/** `GET /api/v2/divisions` (sample: test/fixtures/divisions-page.json). */
export const DivisionsPageSchema = z.object({
  data: z
    .array(z.object({ id: z.number().int(), name: z.string().nullish().transform((v) => v ?? '') }))
    .nullish()
    .transform((v) => v ?? []),
  meta: PageMetaSchema,
});
export type QiscusDivision = z.output<typeof DivisionsPageSchema>['data'][number];

/** `GET /api/v2/admin/agents/by_division` (sample: test/fixtures/agents-by-division-page.json): `data` is the array. */
export const AgentsByDivisionPageSchema = z.object({
  data: z
    .array(z.object({ id: z.number().int() }))
    .nullish()
    .transform((v) => v ?? []),
  meta: PageMetaSchema,
});

/** `POST /api/v1/admin/service/assign_agent` (sample: test/fixtures/assign-agent-response.json). */
export const AssignAgentResponseSchema = z.object({
  data: z.object({
    added_agent: z.object({ id: z.number().int() }).nullish(),
    service: z.object({ id: z.number().int().nullish() }).nullish(),
  }),
});
