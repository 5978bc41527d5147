--! Previous: sha1:cf706aabe47935127061c494309ff18a402dc5d0
--! Hash: sha1:c186b4fc0af2b728d66f5c7fa1556097d1084acf
--! Message: agents read newest version first

-- Agents read newest version first (issue 12, item 5). Every room changes its agent's load twice, and the load is
-- indexed (agents_accepting_by_load), so each change is a new row version with a new primary-key entry. While an
-- old snapshot pins the horizon none of them can be cleaned, and a lookup by id walks every version the agent's
-- load had since: with 20 agents and 20,000 rooms served, 1,100 buffers per agent read, 15,000 per reservation.
-- `version` goes up with every change the allocator makes to the load (free_slot, take_slot, reserve_batch), and
-- agents_newest lists an agent's versions newest first: the hot lookups (`order by version desc limit 1`) stop at
-- the first entry, whatever the history.
alter table allocator.agents add column version bigint not null default 0;
comment on column allocator.agents.version is 'Goes up with each change of the load by the allocator, so that '
  'agents_newest lists an agent''s row versions newest first (see allocator.lock_agent).';
create index agents_newest on allocator.agents (id, version desc);
