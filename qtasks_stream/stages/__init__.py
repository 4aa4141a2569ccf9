"""The lifecycle stages: each a consumer-producer step with its own consumer group."""
