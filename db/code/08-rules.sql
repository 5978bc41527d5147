--------------------------------------------------------------------------------------------------------------------
-- Rules a DBA tunes in SQL. Every rule is read by the next reservation: no restart.
--
--   capacity        update allocator.settings set value = '3' where key = 'default_max_load';
--                   update allocator.agents set max_load = 4 where id = 1001;
--   pause           update allocator.agents set paused = true where id = 1001;
--   priority        insert into allocator.source_priority values ('wa', 10);
--   max wait        update allocator.settings set value = '900' where key = 'max_wait_seconds';
--   agent choice    create or replace function allocator.agent_preference() ... (see 02-agents.sql)
--------------------------------------------------------------------------------------------------------------------

-- Priority by channel source: rooms from a higher-priority source are served first, then in arrival order. A new
-- session takes it in place_new_session (11-routing.sql). (PL/pgSQL, not SQL: it runs for every new session, and a SQL function with a sub-select is planned anew on every
-- call: 0.05-0.14 ms of a 0.3 ms insert.)
create function allocator.priority_of(room_source text)
returns integer
language plpgsql stable
as $$
begin
  return coalesce((select p.priority from allocator.source_priority p where p.source = room_source), 0);
end;
$$;

-- A priority change applies to the rooms already waiting, so the next reservation sees the new order.
create function allocator.reprioritise_waiting()
returns trigger
language plpgsql
as $$
begin
  update allocator.sessions s
  set priority = allocator.priority_of(s.source), updated_at = now()
  where s.in_queue
    and s.source in (select x from unnest(array[
                       case when tg_op <> 'INSERT' then old.source end,
                       case when tg_op <> 'DELETE' then new.source end]) x where x is not null);
  return null;
end;
$$;

create trigger reprioritise_waiting
  after insert or update or delete on allocator.source_priority
  for each row execute function allocator.reprioritise_waiting();

-- Maximum waiting time: a room waiting longer leaves the queue as cancelled, with the reason. The customer's next
-- message (the allocation webhook again) queues the room afresh. Returns how many were cancelled.
create function allocator.cancel_overdue()
returns integer
language plpgsql
as $$
declare
  max_wait interval := allocator.max_wait();
  s        allocator.sessions;
  n        integer := 0;
begin
  if max_wait <= interval '0' then
    return 0;
  end if;
  for s in
    select * from allocator.sessions q
    where q.in_queue and q.queued_at < now() - max_wait
    order by q.queued_at
    for update skip locked
  loop
    if s.holds_slot then
      perform allocator.let_go_slot(s);  -- its call may still land
    end if;
    update allocator.sessions
    set state = 'cancelled', cancelled_at = now(), holds_slot = false, updated_at = now(),
        last_error = format('waited %s, longer than max_wait_seconds (%s s)',
                            date_trunc('second', now() - s.queued_at), extract(epoch from max_wait)::float8)
    where id = s.id;
    n := n + 1;
  end loop;
  return n;
end;
$$;
