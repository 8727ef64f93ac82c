"""The ingest service: Shards raw data into versioned datasets in JetStream."""
