-- Online resharding (SPEC §6 "Online migration"): the shard's own record of which moving
-- arcs of the hash ring it owns, and the guard the shard proxy runs before a statement on
-- keys of a moving arc.
--
-- Why on the shard: the shard is the only place that cannot be stale. A proxy routes by
-- its view of which arcs are moved; its guard takes a shared lock on the arc's row here and
-- fails (SQLSTATE 40001, retryable) unless this shard owns the arc. The mover takes the
-- same rows exclusively on the source and the destination, moves the rows, and flips the
-- states in the same two-phase commit as the data — so no statement ever reads or writes
-- an arc on a shard that does not hold it, whatever a proxy believed.
CREATE TABLE taskflow_moves (
    epoch bigint  NOT NULL,
    arc   integer NOT NULL,
    state text    NOT NULL CHECK (state IN ('owned', 'incoming', 'gone')),
    PRIMARY KEY (epoch, arc)
);

-- The mover finds a moving arc's performers through these.
CREATE INDEX task_observers_performer_id_idx ON task_observers (performer_id);
CREATE INDEX outbox_performer_id_idx ON outbox (performer_id);

-- Locks the rows of `p_owned` arcs of migration `p_epoch` shared (every arc of the
-- migration when `p_lock_all`: key-less writes), waiting at most `p_wait_ms`, and fails
-- unless this shard owns every arc in `p_owned`. Returns how many it checked.
CREATE FUNCTION taskflow_guard(p_epoch bigint, p_owned integer[], p_lock_all boolean, p_wait_ms integer)
RETURNS integer LANGUAGE plpgsql SET lock_timeout = '1s' AS $$
DECLARE
    n   integer;
    bad integer;
BEGIN
    PERFORM set_config('lock_timeout', p_wait_ms::text || 'ms', true);
    IF p_lock_all THEN
        PERFORM 1 FROM taskflow_moves WHERE epoch = p_epoch FOR SHARE;
    END IF;
    SELECT count(*) FILTER (WHERE s.state = 'owned'), min(s.arc) FILTER (WHERE s.state <> 'owned')
      INTO n, bad
      FROM (SELECT m.arc, m.state FROM taskflow_moves m
             WHERE m.epoch = p_epoch AND m.arc = ANY (p_owned) FOR SHARE) s;
    IF n < coalesce(cardinality(p_owned), 0) THEN
        RAISE EXCEPTION 'the rows of moving arc % (ring epoch %) are not on this shard: they moved; retry', coalesce(bad, -1), p_epoch
            USING ERRCODE = '40001',
                  HINT = 'retry the statement or transaction: the shard proxy routes it to the shard that holds them now';
    END IF;
    RETURN n;
EXCEPTION WHEN lock_not_available THEN
    RAISE EXCEPTION 'rows of this statement are being moved to another shard and the move did not finish within % ms; retry', p_wait_ms
        USING ERRCODE = '40001';
END $$;
