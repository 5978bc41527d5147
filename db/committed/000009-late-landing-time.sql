--! Previous: sha1:aaec9361b0312215d7c6dce0484683feedacb91f
--! Hash: sha1:03e3c5e76a720026f47957473a1ba4dcf5937aa1
--! Message: late landing time

-- A call that may have landed after its session was resolved, counted on its agent (settle_resolved_in_flight):
-- when. With late_service_id null (Qiscus named no service: a timeout, a 5xx, a rescue) this is the only trace of
-- which room that count is for, until the next roster pull settles the count; a returning customer's session
-- opened meanwhile takes it over (follow_late_call).
alter table allocator.sessions add column late_landing_at timestamptz;
comment on column allocator.sessions.late_landing_at is 'When a call that may have landed after this session was '
  'resolved was counted on its agent (see settle_resolved_in_flight, follow_late_call).';
