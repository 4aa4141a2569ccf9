"""Task storage as materialized views of the event log."""
