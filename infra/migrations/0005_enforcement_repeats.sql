-- Enforcement that does not give up: what the policy knows of workloads that outlive their
-- terminate commands. A workload known only from its usage gets a row when the policy
-- terminates it (announced = false); usage sampled after a stop makes it running again
-- (resumed_at, resumed_from: the stop it outlived); every terminate command is counted,
-- and ignored_commands says how many of them it outlived (the page shows it).

ALTER TABLE policy_workloads
    ADD COLUMN announced           boolean NOT NULL DEFAULT true,
    ADD COLUMN resumed_at          timestamptz,
    ADD COLUMN resumed_from        timestamptz,
    ADD COLUMN terminate_commands  integer NOT NULL DEFAULT 0,
    ADD COLUMN ignored_commands    integer NOT NULL DEFAULT 0,
    ADD COLUMN last_command_at     timestamptz,
    ADD COLUMN usage_after_command timestamptz;
