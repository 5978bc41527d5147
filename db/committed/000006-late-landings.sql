--! Previous: sha1:852409a04a10a9dcb3d7f8c565ca18217f8da557
--! Hash: sha1:beba0608e54996a43f0c7fd560e723fd717d0ac7
--! Message: late landings

--------------------------------------------------------------------------------------------------------------------
-- A call that landed after its room's resolution puts the agent in the room again, in a new service, which we
-- count on the agent (settle_resolved_in_flight). Kept here, so that the resolution of that service frees it.
--------------------------------------------------------------------------------------------------------------------

alter table allocator.sessions add column late_service_id bigint;
comment on column allocator.sessions.late_service_id is 'The service a late assign call opened after this session '
  'was resolved (counted on agent_id as a room held without us) until its own resolution arrives.';
create index sessions_late_service on allocator.sessions (late_service_id) where late_service_id is not null;

-- How many of our rooms the last roster pull subtracted from the agent's count (see external_after_pull).
alter table allocator.agents add column pulled_ours integer not null default 0;
comment on column allocator.agents.pulled_ours is 'Rooms of ours the last roster pull subtracted from Qiscus''s count '
  '(confirmed before it started and still open).';
