--------------------------------------------------------------------------------------------------------------------
-- Retention: sessions that ended (resolved, failed, cancelled) more than `retention_days` ago are deleted with
-- their attempts (foreign key, on delete cascade), and so are webhooks older than that which no open session
-- needs. The sweep calls prune_history() every few seconds, a small batch each time, through indexes, taking
-- only the locks of the rows it deletes (SKIP LOCKED): the queue never waits for it. `retention_days` 0 keeps all.
--------------------------------------------------------------------------------------------------------------------

-- Deletes up to `batch` old sessions and up to `batch` old webhooks; returns how many rows went.
create function allocator.prune_history(batch integer default 1000)
returns integer
language plpgsql
as $$
declare
  keep    interval := allocator.retention();
  cutoff  timestamptz := now() - keep;
  removed integer := 0;
  n       integer;
begin
  if keep <= interval '0' then
    return 0;
  end if;

  delete from allocator.sessions s
  where s.id in (select q.id from allocator.sessions q
                 where q.state in ('resolved', 'failed', 'cancelled')
                   and coalesce(q.resolved_at, q.failed_at, q.cancelled_at) < cutoff
                   and q.attempt_id is null  -- not a resolution whose call is still in flight
                 order by coalesce(q.resolved_at, q.failed_at, q.cancelled_at)
                 limit batch
                 for update skip locked);
  get diagnostics n = row_count;
  removed := removed + n;

  -- Webhooks by age (webhooks_received_at); those of a session still open stay (its room's story).
  delete from allocator.webhooks w
  where w.id in (select x.id from allocator.webhooks x
                 where x.received_at < cutoff
                   and not exists (select from allocator.sessions o
                                   where o.id = x.session_id and o.state in ('waiting', 'reserved', 'assigned'))
                 order by x.received_at
                 limit batch
                 for update skip locked);
  get diagnostics n = row_count;
  return removed + n;
end;
$$;
