-- The schema of every task shard. Every table carries performer_id, the shard key, so each
-- statement routes to one shard and all of a performer's rows move together when a shard
-- is added. Ids are global (Redis INCR), never generated here.
CREATE TABLE tasks (
    id           bigint      PRIMARY KEY,
    performer_id bigint      NOT NULL,
    creator_id   bigint      NOT NULL,
    title        text        NOT NULL CHECK (char_length(title) BETWEEN 1 AND 255),
    description  text        NOT NULL DEFAULT '' CHECK (char_length(description) <= 10000),
    status       text        NOT NULL DEFAULT 'pending'
                             CHECK (status IN ('pending', 'in_progress', 'completed', 'cancelled')),
    version      bigint      NOT NULL DEFAULT 1,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX tasks_performer_id_idx ON tasks (performer_id, id);
CREATE INDEX tasks_creator_id_idx ON tasks (creator_id, id);
CREATE INDEX tasks_status_idx ON tasks (status, id);

CREATE TABLE task_observers (
    task_id      bigint NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    performer_id bigint NOT NULL,
    user_id      bigint NOT NULL,
    PRIMARY KEY (task_id, user_id)
);

CREATE INDEX task_observers_user_id_idx ON task_observers (user_id, task_id);

-- Transactional outbox: a task write inserts its event here in the same transaction, on
-- the same shard; a relay publishes unsent rows to Kafka and stamps sent_at.
CREATE TABLE outbox (
    id           bigserial   PRIMARY KEY,
    performer_id bigint      NOT NULL,
    event_id     uuid        NOT NULL UNIQUE,
    topic        text        NOT NULL,
    key          text        NOT NULL,
    payload      jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    sent_at      timestamptz
);

CREATE INDEX outbox_unsent_idx ON outbox (id) WHERE sent_at IS NULL;
