"""What the services share below the composition root: the NATS bus, Postgres and its
migrations, settings, dead letters and task helpers.

Services import from here and from `contracts`; `tollgate` (the CLI, `tollgate up`, the
embedded servers) composes them and is imported by no service.
"""
