--! Previous: sha1:03e3c5e76a720026f47957473a1ba4dcf5937aa1
--! Hash: sha1:d6940328ab0cf305d1ed9190fb128a06e447a7f2
--! Message: attempts unanswered

-- An attempt whose call got no answer (a timeout, a dropped connection, a listener that died or shut down with
-- the call out): Qiscus may still be working on it, and it may land until its lease would have ended. A room
-- resolved meanwhile keeps the slot for Qiscus to show until a roster pull after that (accept_close_request,
-- settle_resolved_in_flight). A 5xx, or any other answer, means the call is over.
alter table allocator.attempts add column unanswered boolean not null default false;
comment on column allocator.attempts.unanswered is 'The call got no answer (timeout, dropped connection, listener '
  'gone): Qiscus may still apply it until reserved_at + the lease.';
