"""Record value encoding: Avro in the Confluent wire format, schemas from a registry."""
