--! Previous: sha1:d6940328ab0cf305d1ed9190fb128a06e447a7f2
--! Hash: sha1:cf706aabe47935127061c494309ff18a402dc5d0
--! Message: agents external held

-- A count handed to Qiscus for a call that may still land (hand_slot_to_qiscus) holds only itself: while
-- external_hold_until lasts, a pull may lower the agent's by-hand count down to external_held, not below; the rest
-- (rooms assigned by hand, a pull's phantoms) falls as the pull rules say. external_handed_at: when the last count
-- was handed; a pull that began before it may not have seen that room, and lowers nothing.
alter table allocator.agents add column external_held integer not null default 0;
alter table allocator.agents add column external_handed_at timestamptz;
comment on column allocator.agents.external_held is 'How many of external_load are held until external_hold_until: '
  'rooms whose assign call may still land (see hand_slot_to_qiscus, external_after_pull).';
comment on column allocator.agents.external_handed_at is 'When the last count was handed to external_load by '
  'hand_slot_to_qiscus: a roster pull that began before it lowers nothing.';
