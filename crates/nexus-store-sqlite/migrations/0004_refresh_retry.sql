-- Device refresh retries (see `Store::rotate_device_tokens`): each refresh token records the hash of
-- the refresh token it was traded for, so a retried trade (the answer to the first one was lost) can
-- be told apart from a stolen copy: the retry presents the parent of a still-unused token.
ALTER TABLE device_tokens ADD COLUMN replaces TEXT;
