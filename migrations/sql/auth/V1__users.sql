-- Users of TaskFlow, in the auth database (reached through the proxy's passthrough `auth`).
-- Email is unique case-insensitively: the index is on lower(email), so `Ann@x.io` and
-- `ann@x.io` are one account, while the address is stored as the user typed it.
CREATE TABLE users (
    id            bigserial   PRIMARY KEY,
    email         text        NOT NULL CHECK (char_length(email) BETWEEN 3 AND 254),
    name          text        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 100),
    password_hash text        NOT NULL,
    role          text        NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE UNIQUE INDEX users_email_lower_key ON users (lower(email));
