--! Previous: sha1:b31c7c2bb5172c4dc8fcf775774a1ac7426a5977
--! Hash: sha1:5906c74199500356c86f8bfa0eb4b05fca7af89f
--! Message: agents id not null

-- agents.id had NOT NULL through its primary key (dropped in migration 15); said outright, so that no release of
-- PostgreSQL may take it away with the key.
alter table allocator.agents alter column id set not null;
comment on column allocator.agents.version is 'Goes up with each change of the load by the allocator, so that '
  'agents_newest lists an agent''s row versions newest first (see "Newest version first" in db/code/02-agents.sql).';
