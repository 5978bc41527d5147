--! Previous: sha1:c0b3652cc5f1bbbb5a48626e495a6b1d14648ed9
--! Hash: sha1:aaec9361b0312215d7c6dce0484683feedacb91f
--! Message: roster pulls, agents held for evidence

-- When the last complete roster pull began (issue 12: startup). A listener that starts while another pulled the
-- roster less than AGENT_SYNC_SECONDS ago serves at once from it, as a running listener serves between two pulls,
-- and pulls beside its first calls; one that finds it older (or never pulled) pulls it before its first call.
-- agents.synced_at cannot tell: it moves only on the rows a pull changed.
create table allocator.roster_pulls (
  singleton  boolean primary key default true check (singleton),
  started_at timestamptz,            -- null: never pulled
  agents     integer not null default 0
);
insert into allocator.roster_pulls default values;
comment on table allocator.roster_pulls is 'When the last complete pull of the agent roster began, and how many '
  'agents it listed (see allocator.roster_fresh).';

-- The agents a roster pull could show freer than we count them (allocator.evidence_pull_due, every second): few or
-- none. Without it that probe read every agent row (10,000 agents: 2,700 buffers, 13 ms, once a second per
-- listener, during a drain).
create index agents_held_for_evidence on allocator.agents (id) where external_load > external_seen;
