-- Notice before termination (issue 14 item 3): a notice, and its cancellation, are decisions.
ALTER TABLE policy_decisions DROP CONSTRAINT IF EXISTS policy_decisions_kind_check;
ALTER TABLE policy_decisions ADD CONSTRAINT policy_decisions_kind_check CHECK (kind IN
    ('spawn', 'terminate', 'block', 'unblock', 'warning', 'exceeded',
     'termination_scheduled', 'termination_cancelled'));
