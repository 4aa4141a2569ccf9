"""Local development infrastructure: a real Kafka broker without Docker (see ``kafka``)."""
