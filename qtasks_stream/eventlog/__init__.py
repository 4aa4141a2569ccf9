"""The event log: the ``EventLog`` contract (``base``) and its implementations."""
