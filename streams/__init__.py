"""cdpflow stream processing: Faust app, agents, tables, Avro serde, settings and CLI."""
