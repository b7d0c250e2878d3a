-- fiona index, version 12: users who log in through an LDAP directory or Active Directory.
-- Their row is made at their first login and its role, phi grant and projects are refreshed
-- from their groups at each login; they have no password here (password_hash is '') and
-- no API tokens.
ALTER TABLE users ADD COLUMN source TEXT NOT NULL DEFAULT 'local';  -- local | ldap
